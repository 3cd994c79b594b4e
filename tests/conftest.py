import os

# Tests never reach a model hub: fail fast instead of retrying a lookup.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "helpers"))

import pytest


@pytest.fixture(scope="session")
def random_sd_dir(tmp_path_factory) -> Path:
    """A tiny Stable Diffusion with random weights in diffusers' layout (the embedded model's architecture)."""
    import torch

    from diffrl.tiny.build import build_text_encoder, build_tokenizer, build_unet, build_vae, save_pipeline

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("random_sd")
    tokenizer = build_tokenizer(root / "tokenizer_src")
    save_pipeline(
        root / "model",
        vae=build_vae(),
        text_encoder=build_text_encoder(tokenizer),
        tokenizer=tokenizer,
        unet=build_unet(),
        dtype=torch.float32,
    )
    return root / "model"


def build_random_flux(directory: Path, *, guidance_embeds: bool = False) -> Path:
    """A tiny FLUX.1-architecture pipeline with random weights, saved in diffusers' layout (32 px images)."""
    import torch
    from diffusers import AutoencoderKL

    from diffrl.tiny.build import (
        build_flux_transformer,
        build_t5_encoder,
        build_text_encoder,
        build_tokenizer,
        flux_pipeline,
    )

    torch.manual_seed(0)
    tokenizer = build_tokenizer(directory / "tokenizer_src")
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=32, shift_factor=0.1, scaling_factor=0.6,
        use_quant_conv=False, use_post_quant_conv=False,
    )  # fmt: skip
    pipeline = flux_pipeline(
        vae=vae,
        text_encoder=build_text_encoder(tokenizer),
        tokenizer=tokenizer,
        text_encoder_2=build_t5_encoder(tokenizer, dim=32),
        tokenizer_2=tokenizer,
        transformer=build_flux_transformer(
            text_dim=32, num_layers=1, num_single_layers=1, heads=2, head_dim=16, guidance_embeds=guidance_embeds
        ),
    )
    pipeline.save_pretrained(directory / "model", safe_serialization=True)
    return directory / "model"


@pytest.fixture(scope="session")
def random_flux_dir(tmp_path_factory) -> Path:
    """A tiny random FLUX with true classifier-free guidance (no guidance embedding), as FLUX.1-schnell-like models."""
    return build_random_flux(tmp_path_factory.mktemp("random_flux"))


@pytest.fixture(scope="session")
def random_flux_dev_dir(tmp_path_factory) -> Path:
    """A tiny random FLUX with a guidance embedding, as FLUX.1-dev."""
    return build_random_flux(tmp_path_factory.mktemp("random_flux_dev"), guidance_embeds=True)
