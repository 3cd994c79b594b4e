"""The tiny Stable Diffusion that ships inside the package."""

import json

import torch
from diffusers import StableDiffusionPipeline

from diffrl.tiny import tiny_sd_path


def test_shipped_model_is_small_and_in_diffusers_layout():
    path = tiny_sd_path()
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for component in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (path / component).is_dir()
    weights = sum(p.stat().st_size for p in path.rglob("*.safetensors"))
    assert weights <= 20 * 1024 * 1024
    assert not list(path.rglob("*.bin")) and not list(path.rglob("*.pt"))  # no pickle


def test_shipped_model_samples_with_plain_diffusers_offline_and_reproducibly():
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd_path())
    pipeline.set_progress_bar_config(disable=True)

    def sample():
        return pipeline(
            ["a red circle", "two blue squares"],
            num_inference_steps=10,
            guidance_scale=4.0,
            generator=[torch.Generator().manual_seed(s) for s in (0, 1)],
            output_type="pt",
        ).images

    first = sample()
    assert first.shape == (2, 3, 64, 64)
    assert first.min() >= 0 and first.max() <= 1 and first.std() > 0.05
    assert torch.equal(first, sample())
