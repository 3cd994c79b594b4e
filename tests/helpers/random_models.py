"""Tiny models with random weights, built from the embedded model's configs."""

from pathlib import Path

import torch

from diffrl.tiny.build import build_text_encoder, build_tokenizer, build_unet, build_vae, save_pipeline


def save_random_sd(root: Path, *, scheduler=None, dtype: torch.dtype = torch.float32) -> Path:
    """A tiny Stable Diffusion with random weights (seed 0) saved in diffusers' layout under ``root / "model"``;
    ``scheduler`` defaults to the embedded model's (``diffrl.tiny.build.build_scheduler()``)."""
    torch.manual_seed(0)
    tokenizer = build_tokenizer(root / "tokenizer_src")
    save_pipeline(
        root / "model",
        vae=build_vae(),
        text_encoder=build_text_encoder(tokenizer),
        tokenizer=tokenizer,
        unet=build_unet(),
        scheduler=scheduler,
        dtype=dtype,
    )
    return root / "model"
