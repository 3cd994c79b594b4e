"""The tiny models that ship inside the package: a Stable Diffusion and a FLUX, in diffusers' layout."""

import json

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusionPipeline

from diffrl.tiny import tiny_model_path

PIPELINES = {"sd": StableDiffusionPipeline, "flux": FluxPipeline}
COMPONENTS = {
    "sd": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    "flux": ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler"),
}


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_shipped_model_is_small_and_in_diffusers_layout(family):
    path = tiny_model_path(family)
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == PIPELINES[family].__name__
    for component in COMPONENTS[family]:
        assert (path / component).is_dir()
    weights = sum(p.stat().st_size for p in path.rglob("*.safetensors"))
    assert weights <= 20 * 1024 * 1024
    assert not list(path.rglob("*.bin")) and not list(path.rglob("*.pt"))  # no pickle


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_shipped_model_samples_with_plain_diffusers_offline_and_reproducibly(family):
    pipeline = PIPELINES[family].from_pretrained(tiny_model_path(family))
    pipeline.set_progress_bar_config(disable=True)
    guidance = (
        {"guidance_scale": 4.0}
        if family == "sd"
        else {"true_cfg_scale": 4.0, "negative_prompt": "", "height": 64, "width": 64, "max_sequence_length": 16}
    )

    def sample():
        return pipeline(
            ["a red circle", "two blue squares"],
            num_inference_steps=10,
            generator=[torch.Generator().manual_seed(s) for s in (0, 1)],
            output_type="pt",
            **guidance,
        ).images

    first = sample()
    assert first.shape == (2, 3, 64, 64)
    assert first.min() >= 0 and first.max() <= 1 and first.std() > 0.05
    assert torch.equal(first, sample())
