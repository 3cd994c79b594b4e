"""CLIP-based rewards, built from tiny random-weight CLIP models saved in the layout of the real checkpoints."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

from diffrl.rewards import build_reward
from diffrl.rewards.clip import AestheticHead, clip_preprocess
from diffrl.tiny.build import build_tokenizer
from diffrl.tiny.world import render


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny CLIP with its tokenizer and image-processor config, as in openai/clip-vit-large-patch14's folder."""
    root = tmp_path_factory.mktemp("clip")
    tokenizer = build_tokenizer(root / "tok")
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 16, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "image_size": 32, "patch_size": 8,
        },
        projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        root / "model"
    )
    return root / "model"


def images(batch=3, size=64):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def _processor_and_ours(batch_uint8: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    processor = CLIPImageProcessor()  # 224, bicubic, centre crop, CLIP mean/std
    expected = processor(images=[Image.fromarray(im) for im in batch_uint8], return_tensors="np")["pixel_values"]
    ours = clip_preprocess(torch.from_numpy(batch_uint8.copy()).permute(0, 3, 1, 2).float() / 255)
    return ours, torch.as_tensor(np.array(expected))


def test_tensor_preprocessing_matches_the_clip_image_processor_on_scenes():
    scenes = np.stack([render("a red square left of a blue circle", seed) for seed in range(4)])
    ours, expected = _processor_and_ours(scenes)
    assert ours.shape == expected.shape == (4, 3, 224, 224)
    # measured: mean 0.0005, max 0.016 (normalised units; one grey level is about 0.015)
    assert (ours - expected).abs().mean().item() < 0.002
    assert (ours - expected).abs().max().item() < 0.05


@pytest.mark.parametrize("shape", [(64, 64), (48, 80)])
def test_tensor_preprocessing_matches_the_clip_image_processor_on_noise(shape):
    noise = np.random.default_rng(0).integers(0, 256, size=(2, *shape, 3), dtype=np.uint8)
    ours, expected = _processor_and_ours(noise)
    assert ours.shape == expected.shape == (2, 3, 224, 224)
    # pixel noise is the worst case: PIL's bicubic kernel (a = -0.5) and torch's (a = -0.75) differ most on
    # high frequencies; measured mean ~0.015 and max ~0.35
    assert (ours - expected).abs().mean().item() < 0.025
    assert (ours - expected).abs().max().item() < 0.45


def test_clipscore_and_pickscore_end_to_end(clip_dir):
    model = CLIPModel.from_pretrained(clip_dir)
    batch, prompts = images(), ["a red circle", "two blue squares", "a green triangle"]
    clipscore = build_reward("clipscore", model_dir=str(clip_dir))
    pickscore = build_reward("pickscore", model_dir=str(clip_dir), processor_dir=str(clip_dir), batch_size=2)
    with torch.no_grad():
        out = model(
            input_ids=model_tokens(clip_dir, prompts),
            pixel_values=clip_preprocess(batch, 32),
        )
    cos = out.logits_per_image.diagonal() / model.logit_scale.exp()
    torch.testing.assert_close(clipscore(batch, prompts, [{}] * 3), 2.5 * cos.clamp(min=0), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        pickscore(batch, prompts, [{}] * 3), out.logits_per_image.diagonal(), atol=1e-4, rtol=1e-4
    )


def model_tokens(clip_dir, prompts):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(clip_dir)
    return tokenizer(prompts, padding="max_length", max_length=16, return_tensors="pt").input_ids


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_aesthetic_end_to_end(clip_dir, tmp_path, suffix):
    torch.manual_seed(0)
    head = AestheticHead(embed_dim=16)
    path = tmp_path / f"head{suffix}"
    if suffix == ".pth":
        torch.save(head.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file(head.state_dict(), path)
    reward = build_reward("aesthetic", model_dir=str(clip_dir), head_path=str(path))
    model = CLIPModel.from_pretrained(clip_dir)
    batch = images()
    with torch.no_grad():
        embeds = model.visual_projection(model.vision_model(pixel_values=clip_preprocess(batch, 32)).pooler_output)
        expected = head.eval()(embeds / embeds.norm(dim=-1, keepdim=True)).squeeze(1)
    torch.testing.assert_close(reward(batch, ["x"] * 3, [{}] * 3), expected, atol=1e-5, rtol=1e-4)


def test_missing_aesthetic_head_says_where_to_get_it(clip_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="sac\\+logos\\+ava1-l14-linearMSE.pth"):
        build_reward("aesthetic", model_dir=str(clip_dir), head_path=str(tmp_path / "missing.pth"))


def test_preprocessing_is_differentiable():
    batch = images(1).requires_grad_(True)
    clip_preprocess(batch, 32).sum().backward()
    assert batch.grad is not None and batch.grad.abs().sum() > 0
