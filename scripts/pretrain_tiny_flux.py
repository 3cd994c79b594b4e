"""Pretrain the embedded tiny FLUX on the shapes world (CPU-friendly, resumable).

    python scripts/pretrain_tiny_flux.py --out src/diffrl/tiny/flux --work runs/pretrain_tiny_flux

The tiny FLUX shares the shipped tiny Stable Diffusion's autoencoder (4x, 64x64x3 -> 16x16x4) and CLIP text
encoder (FLUX uses its pooled output), both frozen; it trains a FLUX.1-layout transformer and a small T5 encoder
jointly with the rectified-flow loss. Stages, each resumable (re-run the same command after an interruption):
  1. render and caption the scenes as scripts/pretrain_tiny.py does, with the same options and defaults (the same
     data set, reused from ``--data`` when that folder has it), and encode them with the shipped VAE;
  2. train transformer + T5: ``x_t = (1 - t) x0 + t eps``, target ``eps - x0``, ``t`` logit-normal, 10% empty
     captions (for classifier-free guidance), an EMA of the weights;
  3. save the EMA weights with the shared parts as a ``FluxPipeline`` in diffusers' layout to ``--out``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FluxPipeline
from transformers import CLIPTextModel, CLIPTokenizer

from diffrl.tiny import tiny_model_path
from diffrl.tiny.build import MAX_TOKENS, build_flux_transformer, build_t5_encoder, flux_pipeline
from pretrain_tiny import add_joint_training_args, encode_latents, looseness_of, render_dataset, train_jointly


def shared_parts() -> tuple[AutoencoderKL, CLIPTextModel, CLIPTokenizer]:
    """The tiny SD's VAE, CLIP text encoder and tokenizer, frozen."""
    sd = tiny_model_path("sd")
    vae = AutoencoderKL.from_pretrained(sd / "vae", torch_dtype=torch.float32).eval().requires_grad_(False)
    text_encoder = CLIPTextModel.from_pretrained(sd / "text_encoder").eval().requires_grad_(False)
    return vae, text_encoder, CLIPTokenizer.from_pretrained(sd / "tokenizer")


def pack(latents: torch.Tensor) -> torch.Tensor:
    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def train_transformer(work: Path, latents: torch.Tensor, captions: list[str], parts, args: argparse.Namespace):
    _, clip, tokenizer = parts
    transformer = build_flux_transformer()
    t5 = build_t5_encoder(tokenizer)

    def tokens(texts: list[str]) -> torch.Tensor:
        return tokenizer(texts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")[
            "input_ids"
        ]

    ids, empty = tokens(captions), tokens([""])
    with torch.no_grad():  # CLIP is frozen: its pooled embedding of every caption, once
        pooled = torch.cat([clip(ids[i : i + 1024]).pooler_output for i in range(0, len(ids), 1024)])
        empty_pooled = clip(empty).pooler_output
    side = latents.shape[-1]
    img_ids = FluxPipeline._prepare_latent_image_ids(1, side // 2, side // 2, "cpu", torch.float32)
    txt_ids = torch.zeros(MAX_TOKENS, 3)
    generator = torch.Generator().manual_seed(args.seed + 3)

    def loss_fn() -> torch.Tensor:
        index = torch.randint(0, latents.shape[0], (args.batch,), generator=generator)
        x0 = pack(latents[index])
        batch_ids, batch_pooled = ids[index].clone(), pooled[index].clone()
        drop = torch.rand(args.batch, generator=generator) < args.empty_caption_prob
        batch_ids[drop], batch_pooled[drop] = empty, empty_pooled
        t = torch.sigmoid(torch.randn(args.batch, generator=generator))  # logit-normal, as SD3 and FLUX
        noise = torch.randn(x0.shape, generator=generator)
        x_t = (1 - t.view(-1, 1, 1)) * x0 + t.view(-1, 1, 1) * noise
        pred = transformer(
            hidden_states=x_t,
            timestep=t,
            pooled_projections=batch_pooled,
            encoder_hidden_states=t5(batch_ids)[0],
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        return F.mse_loss(pred, noise - x0)

    train_jointly(
        {"transformer": transformer, "t5": t5},
        loss_fn,
        generator=generator,
        ckpt=work / "transformer_ckpt.pt",
        steps=args.steps,
        desc="transformer",
        args=args,
    )
    return transformer, t5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("src/diffrl/tiny/flux"), help="where the model is saved")
    parser.add_argument("--work", type=Path, default=Path("runs/pretrain_tiny_flux"), help="checkpoints")
    parser.add_argument("--data", type=Path, default=Path("runs/pretrain_tiny"), help="scenes (shared with SD)")
    add_joint_training_args(parser, "the transformer and T5")
    parser.add_argument("--steps", type=int, default=3000, help="transformer and T5 steps")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.work.mkdir(parents=True, exist_ok=True)
    args.data.mkdir(parents=True, exist_ok=True)
    started = time.time()
    images, captions = render_dataset(args.data, args.num_scenes, args.seed, looseness_of(args), args.scenes)
    parts = shared_parts()
    latents = encode_latents(args.data, parts[0], images[: args.num_scenes])[: args.num_scenes]
    transformer, t5 = train_transformer(args.work, latents, captions[: args.num_scenes], parts, args)
    vae, clip, tokenizer = parts
    pipeline = flux_pipeline(
        vae=vae,
        text_encoder=clip,
        tokenizer=tokenizer,
        text_encoder_2=t5,
        tokenizer_2=tokenizer,
        transformer=transformer,
    )
    transformer.to(torch.float16)  # diffusers loads it back as float32 unless asked otherwise
    pipeline.save_pretrained(args.out, safe_serialization=True)
    print(f"saved the tiny FLUX to {args.out} ({(time.time() - started) / 60:.1f} min this run)")


if __name__ == "__main__":
    main()
