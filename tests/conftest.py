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
