"""Real-architecture smoke runs on a CPU: full-width SDXL and SD3.5-Medium (random weights, reduced depth) through
one GRPO epoch at a small resolution, with and without gradient checkpointing: seconds per trained step and peak
resident memory.

    python scripts/smoke_real_architectures.py [--families sd15,sdxl,sd35m] [--resolution 256] [--json out.json]

What is real and what is reduced (each model is built from configs with random weights and saved in diffusers'
layout, then loaded through ``diffrl.policies`` as users load the real ones):

- SD1.5: the real UNet (widths 320/640/1280/1280, 2 layers a block), CLIP-L's width (768) with 1 of 12 layers,
  the real VAE widths with 1 layer a block.
- SDXL: the real UNet widths (320/640/1280, cross-attention 2048, added text-time conditioning 2816) with one
  transformer layer per attention block (SDXL has 1/2/10) and 1 resnet a block (SDXL 2); CLIP-L (768) and
  OpenCLIP-bigG (1280, projection 1280) at their widths with 1 layer each; the real VAE widths, 1 layer a block.
- SD3.5-M: the MMDiT at its width (24 heads x 64 = 1536, joint attention 4096, pooled 2048, patch 2, 16 latent
  channels) with 2 of its 24 blocks; CLIP-L, CLIP-G (1 layer each) and a 1-layer T5 of T5-XXL's width (4096, feed-
  forward 10240, 64 heads); the 16-channel VAE at its widths, 1 layer a block.
- Every text encoder uses the embedded tiny tokenizer's vocabulary (the shapes grammar's words), so the embedding
  tables are small: a real vocabulary adds 49,408 x width parameters to each CLIP and 32,128 x 4096 to T5.

Each model is built and saved by one process; each (family, checkpointing) then loads it and trains in its own
process, whose peak resident memory (ru_maxrss) is the figure.
A GRPO epoch here: 2 prompts x 2 images, 4 DDIM/flow steps, the first 2 stochastic and trained, micro-batch 1.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FAMILIES = ("sd15", "sdxl", "sd35m")


def clip_config(tokenizer, hidden: int, layers: int, projection: int | None = None):
    from transformers import CLIPTextConfig

    from diffrl.tiny.build import MAX_TOKENS

    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, max_position_embeddings=MAX_TOKENS, projection_dim=projection or hidden,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip


def vae(latent_channels: int, **extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=32, sample_size=1024, **extra,
    )  # fmt: skip


def build(family: str, directory: Path) -> Path:
    """A random-weight pipeline of ``family`` in diffusers' layout under ``directory``."""
    import torch
    from diffusers import (
        DDIMScheduler,
        EulerDiscreteScheduler,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from diffrl.tiny.build import build_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tokenizer(directory / "tokenizer_src")
    if family == "sd15":
        unet = UNet2DConditionModel(cross_attention_dim=768, sample_size=64)  # diffusers' defaults are SD1.5's UNet
        pipeline = StableDiffusionPipeline(
            vae=vae(4), text_encoder=CLIPTextModel(clip_config(tokenizer, 768, 1)), tokenizer=tokenizer, unet=unet,
            scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                    clip_sample=False, set_alpha_to_one=False, steps_offset=1),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip
    elif family == "sdxl":
        unet = UNet2DConditionModel(
            sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(5, 10, 20), use_linear_projection=True, transformer_layers_per_block=(1, 1, 1),
            cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )  # fmt: skip
        pipeline = StableDiffusionXLPipeline(
            vae=vae(4), text_encoder=CLIPTextModel(clip_config(tokenizer, 768, 1)),
            text_encoder_2=CLIPTextModelWithProjection(clip_config(tokenizer, 1280, 1, projection=1280)),
            tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
            scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                             steps_offset=1, timestep_spacing="leading"),
        )  # fmt: skip
    else:
        transformer = SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=64,
            num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
            pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=(0,),
        )  # fmt: skip
        t5 = T5EncoderModel(
            T5Config(vocab_size=len(tokenizer), d_model=4096, d_kv=64, d_ff=10240, num_layers=1, num_heads=64,
                     feed_forward_proj="gated-gelu", pad_token_id=tokenizer.pad_token_id,
                     eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
        )  # fmt: skip
        pipeline = StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=vae(16, shift_factor=0.0609, scaling_factor=1.5305, use_quant_conv=False, use_post_quant_conv=False),
            text_encoder=CLIPTextModelWithProjection(clip_config(tokenizer, 768, 1)), tokenizer=tokenizer,
            text_encoder_2=CLIPTextModelWithProjection(clip_config(tokenizer, 1280, 1)), tokenizer_2=tokenizer,
            text_encoder_3=t5, tokenizer_3=tokenizer,
        )  # fmt: skip
    pipeline.save_pretrained(directory / "model", safe_serialization=True)
    return directory / "model"


def child(spec: dict) -> dict:
    from diffrl.config import FLUX_ATTENTION, Config, apply_overrides
    from diffrl.trainers import make_trainer

    family = {"sd15": "sd", "sdxl": "sdxl", "sd35m": "sd3"}[spec["family"]]
    path = Path(spec["path"])
    with tempfile.TemporaryDirectory() as work:
        overrides = [
            "--model.family", family, "--model.path", str(path), "--model.resolution", str(spec["resolution"]),
            "--model.gradient_checkpointing", str(spec["checkpointing"]).lower(),
            "--sample.num_steps", "4", "--sample.sde_window", "0,2", "--sample.guidance_scale", "4.0",
            "--sample.batch_size", "4", "--sample.num_batches_per_epoch", "1",
            "--train.batch_size", "1", "--train.gradient_accumulation_steps", "4", "--train.group_size", "2",
            "--train.epochs", "1", "--reward.spec", "jpeg_compressibility", "--eval.every_epochs", "0",
            "--logging.output_dir", str(Path(work) / "run"), "--logging.progress_bars", "false",
            "--logging.checkpoint_every", "0",
        ]  # fmt: skip
        if family == "sd3":
            overrides += ["--lora.target_modules", ",".join(FLUX_ATTENTION), "--model.max_sequence_length", "16"]
        trainer = make_trainer(apply_overrides(Config(), overrides))
        started = time.perf_counter()
        samples = trainer.sample_epoch(0, trainer.epoch_sampler(0))
        sampled = time.perf_counter()
        advantages = trainer.advantages(samples, trainer.gather_rewards(samples))
        metrics = trainer.train_epoch(0, samples, advantages)
        trained = time.perf_counter()
        trained_steps = 4 * 2  # 4 images x 2 stochastic steps, one forward/backward each
        return {
            **spec,
            "sampling_s": sampled - started,
            "s_per_trained_step": (trained - sampled) / trained_steps,
            "optimizer_steps": metrics["train/optimizer_steps"],
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "trained_parameters_m": sum(p.numel() for p in trainer.params) / 1e6,
            "model_parameters_m": sum(p.numel() for p in trainer.policy.model.parameters()) / 1e6,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--build", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if args.build:
        build(args.build[0], Path(args.build[1]))
        return
    rows = []
    work = tempfile.TemporaryDirectory()
    for family in args.families.split(","):
        directory = Path(work.name) / family
        subprocess.run([sys.executable, __file__, "--build", family, str(directory)], check=True, capture_output=True)
        for checkpointing in (False, True):
            spec = {"family": family, "checkpointing": checkpointing, "resolution": args.resolution}
            spec["path"] = str(directory / "model")
            out = subprocess.run(
                [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, check=False
            )
            if out.returncode != 0:
                print(out.stdout[-2000:], out.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"{family} (checkpointing {checkpointing}) failed")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{family:6s} checkpointing={checkpointing!s:5s} {r['s_per_trained_step']:.2f} s/trained step, "
                  f"peak RSS {r['peak_rss_gib']:.1f} GiB, {r['model_parameters_m']:.0f} M network parameters",
                  flush=True)  # fmt: skip
    print("\n| family | checkpointing | s per trained step | sampling s (4 images) | peak RSS GiB | network M |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['family']} | {r['checkpointing']} | {r['s_per_trained_step']:.2f} | {r['sampling_s']:.1f} | "
              f"{r['peak_rss_gib']:.1f} | {r['model_parameters_m']:.0f} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
