"""Pretrain the embedded tiny Stable Diffusion on the shapes world (CPU-friendly, resumable).

    python scripts/pretrain_tiny.py --out src/diffrl/tiny/sd --work runs/pretrain_tiny

Stages, each resumable from its latest checkpoint under ``--work`` (re-run the same command after an interruption):
  1. render a fixed data set of scenes from the whole grammar (held-out prompts are held out from RL only; with
     --scenes train, from the training prompts only, so that a held-out prompt is never seen) and caption each
     loosely (``diffrl.tiny.world.loose_caption``): by default half of the scenes exactly and the other half with
     another prompt altogether (--mismatch), so that the model draws every scene well but follows a prompt or
     ignores it as a whole, a choice made early in sampling: the headroom RL is there to take (--attribute-noise,
     --partial and --drop-color loosen captions word by word instead);
  2. train the 4x VAE (64x64x3 -> 16x16x4) on those scenes (or reuse one: --vae); set its latent scaling factor
     to 1 / std(latents);
  3. cache the latents of every scene;
  4. train the UNet and the text encoder jointly (min-SNR weighting, 10% empty captions for classifier-free
     guidance, an EMA of the weights); the schedule ends in pure noise and the UNet predicts v (zero terminal SNR,
     see ``diffrl.tiny.build.build_scheduler``; --no-zero-terminal-snr: SD's schedule and epsilon prediction);
  5. save the EMA weights in diffusers' layout to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.training_utils import EMAModel, compute_snr
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from diffrl.tiny.build import (
    build_scheduler,
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
    save_pipeline,
)
from diffrl.tiny.world import Looseness, captions_by_kind, load_prompts, loose_caption, render, sample_caption


def atomic_torch_save(obj: object, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_save_file(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------------------------------------------------------
# 1. data


SCENE_SETS = ("train", "all")
# how scenes were captioned before a field of Looseness existed: a data set saved then is read with these values
BEFORE_FIELDS = {"mismatch": 0.0}


def render_dataset(
    work: Path, num_scenes: int, seed: int, looseness: Looseness, scenes: str
) -> tuple[torch.Tensor, list[str]]:
    """``[N, 64, 64, 3]`` uint8 scenes and the loose caption each is trained with.

    ``scenes`` is ``"train"`` (scenes and captions of the training prompts only: a held-out prompt is never seen,
    not even as a wrong caption) or ``"all"`` (the whole grammar: held-out prompts are then held out from RL only,
    as a web-pretrained model has seen most compositions an RL benchmark asks for).
    """
    if scenes not in SCENE_SETS:
        raise SystemExit(f"--scenes must be one of {SCENE_SETS}; got {scenes!r}.")
    path = work / "scenes.safetensors"
    captions_path = work / "captions.json"
    if path.exists() and captions_path.exists():
        saved = json.loads(captions_path.read_text())
        if "looseness" not in saved or Looseness(**{**BEFORE_FIELDS, **saved["looseness"]}) != looseness:
            raise SystemExit(f"{work} holds scenes captioned with {saved.get('looseness')}; use another --work.")
        if saved.get("scene_set", "train") != scenes:
            raise SystemExit(f"{work} holds scenes of --scenes {saved.get('scene_set', 'train')}; use another --work.")
        return load_file(path)["images"], saved["texts"]
    rng = random.Random(seed)
    prompts = load_prompts("train") + (load_prompts("heldout") if scenes == "all" else [])
    by_kind, allowed = captions_by_kind(prompts), set(prompts)
    scene_texts, texts, images = [], [], np.empty((num_scenes, 64, 64, 3), dtype=np.uint8)
    for i in tqdm(range(num_scenes), desc="render scenes"):
        caption = sample_caption(rng, by_kind)
        scene_texts.append(caption.text)
        texts.append(loose_caption(caption, looseness, rng, allowed))
        images[i] = render(caption, seed * 10_000_019 + i)
    atomic_save_file({"images": torch.from_numpy(images)}, path)
    captions_path.write_text(
        json.dumps({"looseness": vars(looseness), "scene_set": scenes, "scenes": scene_texts, "texts": texts})
    )
    return torch.from_numpy(images), texts


def to_model_space(images_uint8: torch.Tensor) -> torch.Tensor:
    """[N, 64, 64, 3] uint8 -> [N, 3, 64, 64] float in [-1, 1]."""
    return images_uint8.permute(0, 3, 1, 2).float() / 127.5 - 1.0


# ---------------------------------------------------------------------------------------------------------------
# 2-3. VAE and latents


def train_vae(work: Path, images: torch.Tensor, args: argparse.Namespace):
    vae = build_vae()
    if args.vae is not None:
        if not (args.vae / "config.json").exists():
            raise SystemExit(f"--vae {args.vae} holds no autoencoder (no config.json); give a model's vae folder.")
        return type(vae).from_pretrained(args.vae).eval()
    final = work / "vae_final"
    if (final / "config.json").exists():
        return type(vae).from_pretrained(final)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    ckpt = work / "vae_ckpt.pt"
    step = 0
    generator = torch.Generator().manual_seed(args.seed + 1)
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        vae.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        step = state["step"]
    vae.train()
    bar = tqdm(total=args.vae_steps, initial=step, desc="vae")
    while step < args.vae_steps:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.vae_steps, args.vae_lr, warmup=100)
        index = torch.randint(0, images.shape[0], (args.vae_batch,), generator=generator)
        x = to_model_space(images[index])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=generator)).sample
        loss = F.mse_loss(recon, x) + args.vae_kl * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % args.checkpoint_every == 0 or step == args.vae_steps:
            state = {"model": vae.state_dict(), "optimizer": optimizer.state_dict(), "step": step}
            state["generator"] = generator.get_state()
            atomic_torch_save(state, ckpt)
    bar.close()
    vae.eval()
    vae.save_pretrained(final)
    return vae


@torch.no_grad()
def encode_latents(work: Path, vae, images: torch.Tensor) -> torch.Tensor:
    """Latent means of every scene, scaled by the VAE's scaling factor (set here to 1 / std)."""
    path = work / "latents.safetensors"
    if path.exists():
        latents = load_file(path)["latents"]
    else:
        chunks = [vae.encode(to_model_space(images[i : i + 256])).latent_dist.mean for i in range(0, len(images), 256)]
        latents = torch.cat(chunks)
        atomic_save_file({"latents": latents}, path)
    scaling_factor = 1.0 / latents.std().item()
    vae.register_to_config(scaling_factor=scaling_factor)
    return latents * scaling_factor


# ---------------------------------------------------------------------------------------------------------------
# 4. UNet + text encoder


def train_jointly(
    modules: dict[str, torch.nn.Module],
    loss_fn,
    *,
    generator: torch.Generator,
    ckpt: Path,
    steps: int,
    desc: str,
    args: argparse.Namespace,
) -> None:
    """The resumable loop that trains a tiny model's networks together: AdamW (weight decay 0.01) on every parameter
    of ``modules``, linear warm-up then cosine learning rate peaking at ``args.lr``, gradient clipping at 1, an EMA
    (``args.ema_decay``) copied into the weights at the end, and an atomic checkpoint (weights, optimizer, EMA,
    ``generator``) every ``args.checkpoint_every`` steps. ``loss_fn()`` draws its batch from ``generator``."""
    params = [p for module in modules.values() for p in module.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    ema = EMAModel(params, decay=args.ema_decay)
    step = 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        for name, module in modules.items():
            module.load_state_dict(state[name])
        optimizer.load_state_dict(state["optimizer"])
        ema.load_state_dict(state["ema"])
        generator.set_state(state["generator"])
        step = state["step"]
    for module in modules.values():
        module.train()
    bar = tqdm(total=steps, initial=step, desc=desc)
    started = time.time()
    while step < steps:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, args.lr, warmup=200)
        loss = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        ema.step(params)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", samples_per_s=f"{args.batch * bar.n / (time.time() - started):.0f}")
        if step % args.checkpoint_every == 0 or step == steps:
            state = {name: module.state_dict() for name, module in modules.items()}
            state.update(optimizer=optimizer.state_dict(), ema=ema.state_dict(), generator=generator.get_state())
            atomic_torch_save({**state, "step": step}, ckpt)
    bar.close()
    ema.copy_to(params)
    for module in modules.values():
        module.eval()


def train_unet(work: Path, latents: torch.Tensor, captions: list[str], args: argparse.Namespace):
    tokenizer = build_tokenizer(work / "tokenizer")
    text_encoder = build_text_encoder(tokenizer)
    unet = build_unet()
    if args.init is not None:
        if not (args.init / "unet" / "config.json").exists():
            raise SystemExit(f"--init {args.init} holds no tiny SD (no unet/config.json); give a model directory.")
        unet = type(unet).from_pretrained(args.init / "unet", torch_dtype=torch.float32)
        text_encoder = type(text_encoder).from_pretrained(args.init / "text_encoder", torch_dtype=torch.float32)
    scheduler = build_scheduler(args.zero_terminal_snr)
    schedule_path = work / "unet_schedule.json"
    schedule = {"zero_terminal_snr": args.zero_terminal_snr, "init": None if args.init is None else str(args.init)}
    if schedule_path.exists() and json.loads(schedule_path.read_text()) != schedule:
        raise SystemExit(f"{work} holds a UNet trained with {schedule_path.read_text()}; use another --work.")
    schedule_path.write_text(json.dumps(schedule))
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
    ids = ids.input_ids
    empty_ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
    empty_ids = empty_ids.input_ids
    generator = torch.Generator().manual_seed(args.seed + 2)
    alphas_cumprod = scheduler.alphas_cumprod

    def loss_fn() -> torch.Tensor:
        index = torch.randint(0, latents.shape[0], (args.batch,), generator=generator)
        x0 = latents[index]
        batch_ids = ids[index].clone()
        drop = torch.rand(args.batch, generator=generator) < args.empty_caption_prob
        batch_ids[drop] = empty_ids
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        encoder_hidden_states = text_encoder(batch_ids)[0]
        pred = unet(x_t, t, encoder_hidden_states).sample
        snr = compute_snr(scheduler, t)
        if args.zero_terminal_snr:
            # v-prediction; min-SNR-gamma's clean-sample weight plus one, so that the pure-noise end (SNR 0), where the
            # caption alone decides the scene, keeps a weight of 1 instead of 0
            target = scheduler.get_velocity(x0, noise, t)
            weight = (torch.clamp(snr, max=args.snr_gamma) + 1) / (snr + 1)
        else:
            target, weight = noise, torch.clamp(snr, max=args.snr_gamma) / snr  # min-SNR-gamma for epsilon prediction
        return (weight * F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))).mean()

    modules = {"unet": unet, "text_encoder": text_encoder}
    train_jointly(
        modules,
        loss_fn,
        generator=generator,
        ckpt=work / "unet_ckpt.pt",
        steps=args.unet_steps,
        desc="unet",
        args=args,
    )
    return unet, text_encoder, tokenizer, scheduler


def add_joint_training_args(parser: argparse.ArgumentParser, networks: str, batch: int = 128) -> None:
    """The options both pretraining scripts share; :func:`train_jointly` reads --lr, --ema-decay and
    --checkpoint-every."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-scenes", type=int, default=60_000)
    parser.add_argument("--attribute-noise", type=float, default=Looseness.attribute_noise)
    parser.add_argument("--partial", type=float, default=Looseness.partial)
    parser.add_argument("--drop-color", type=float, default=Looseness.drop_color)
    parser.add_argument(
        "--mismatch",
        type=float,
        default=Looseness.mismatch,
        help="share of scenes captioned with another prompt altogether",
    )
    parser.add_argument(
        "--scenes",
        choices=SCENE_SETS,
        default="all",
        help="which prompts' scenes and captions pretraining sees: the training prompts only, or the whole grammar "
        "(held-out prompts then held out from RL only)",
    )
    parser.add_argument("--batch", type=int, default=batch, help="scenes per step")
    parser.add_argument("--lr", type=float, default=5e-4, help=f"peak learning rate of {networks}")
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--empty-caption-prob", type=float, default=0.1)
    parser.add_argument("--checkpoint-every", type=int, default=250, help="steps between checkpoints")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads")


def looseness_of(args: argparse.Namespace) -> Looseness:
    return Looseness(
        attribute_noise=args.attribute_noise, partial=args.partial, drop_color=args.drop_color, mismatch=args.mismatch
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("src/diffrl/tiny/sd"), help="where the model is saved")
    parser.add_argument("--work", type=Path, default=Path("runs/pretrain_tiny"), help="data and checkpoints")
    add_joint_training_args(parser, "the UNet and text encoder", batch=64)
    parser.add_argument(
        "--vae",
        type=Path,
        default=None,
        help="an autoencoder folder to reuse instead of training one (e.g. src/diffrl/tiny/sd/vae when only the "
        "UNet's data changes; its scaling factor is set again from these scenes' latents)",
    )
    parser.add_argument(
        "--init",
        type=Path,
        default=None,
        help="start the UNet and text encoder from this model's weights instead of random ones (continued "
        "pretraining, e.g. onto --zero-terminal-snr; --unet-steps then counts the added steps)",
    )
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--vae-batch", type=int, default=32)
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--vae-kl", type=float, default=1e-5, help="weight of the VAE's KL term")
    parser.add_argument("--unet-steps", type=int, default=4000)
    parser.add_argument("--snr-gamma", type=float, default=5.0)
    parser.add_argument(
        "--zero-terminal-snr",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="rescale the schedule to end in pure noise and train v-prediction with trailing timesteps (the "
        "default; --no-zero-terminal-snr: the plain SD schedule, epsilon prediction)",
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    images, captions = render_dataset(args.work, args.num_scenes, args.seed, looseness_of(args), args.scenes)
    vae = train_vae(args.work, images, args)
    latents = encode_latents(args.work, vae, images)
    unet, text_encoder, tokenizer, scheduler = train_unet(args.work, latents, captions, args)
    save_pipeline(args.out, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
    print(f"saved the tiny model to {args.out} ({(time.time() - started) / 60:.1f} min this run)")


if __name__ == "__main__":
    main()
