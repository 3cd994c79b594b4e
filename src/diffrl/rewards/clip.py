"""CLIP-based rewards: LAION aesthetic, PickScore and CLIPScore, on transformers' ``CLIPModel``.

Weights load from a local directory or a hub id (``model_dir``) when the reward is built, never at import.
Preprocessing runs on tensors and follows ``CLIPImageProcessor``: resize the shortest edge (bicubic, antialiased),
centre-crop, normalise with the model's mean and std; it is differentiable, so reward-gradient methods can use it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from diffrl.rewards.combine import Reward

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(
    images: torch.Tensor, size: int = 224, mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD
) -> torch.Tensor:
    """``[B, 3, H, W]`` in [0, 1] -> CLIP pixel values ``[B, 3, size, size]``."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"CLIP rewards expect images [B, 3, H, W] in [0, 1]; got {tuple(images.shape)}.")
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    resized = F.interpolate(images.float(), size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    cropped = resized[:, :, top : top + size, left : left + size].clamp(0, 1)
    mean_t = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    return (cropped - mean_t) / std_t


def _image_config(directory: str) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """Crop size, mean and std from a local ``preprocessor_config.json`` (CLIP's defaults otherwise)."""
    path = Path(directory) / "preprocessor_config.json"
    if not path.is_file():
        return 224, CLIP_MEAN, CLIP_STD
    config = json.loads(path.read_text())
    crop = config.get("crop_size", 224)
    size = crop["height"] if isinstance(crop, dict) else int(crop)
    return size, tuple(config.get("image_mean", CLIP_MEAN)), tuple(config.get("image_std", CLIP_STD))


class ClipScorer:
    """A frozen ``CLIPModel`` with its tokenizer: normalised image and text embeddings."""

    def __init__(self, model, tokenizer, processor_dir: str, device: str = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.size, self.mean, self.std = _image_config(processor_dir)

    @classmethod
    def load(cls, model_dir: str, processor_dir: str | None = None, device: str = "cpu", dtype=torch.float32):
        """From a local directory or hub id (``processor_dir``: where the tokenizer and image config live)."""
        from transformers import AutoTokenizer, CLIPModel

        processor_dir = processor_dir or model_dir
        model = CLIPModel.from_pretrained(model_dir, dtype=dtype)
        return cls(model, AutoTokenizer.from_pretrained(processor_dir), processor_dir, device)

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        pixels = clip_preprocess(images.to(self.device), self.size, self.mean, self.std).to(self.model.dtype)
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        embeds = self.model.visual_projection(pooled).float()
        return embeds / embeds.norm(dim=-1, keepdim=True)

    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.model.config.text_config.max_position_embeddings,
            truncation=True,
            return_tensors="pt",
        ).to(self.device)
        pooled = self.model.text_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).pooler_output
        embeds = self.model.text_projection(pooled).float()
        return embeds / embeds.norm(dim=-1, keepdim=True)


def _batched(fn, images: torch.Tensor, prompts: list[str], batch_size: int) -> torch.Tensor:
    chunks = [fn(images[i : i + batch_size], prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)]
    return torch.cat(chunks).cpu()


class AestheticHead(torch.nn.Module):
    """The LAION improved aesthetic predictor's MLP (on normalised CLIP ViT-L/14 image embeddings)."""

    def __init__(self, embed_dim: int = 768):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(embed_dim, 1024),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(embeds)


def local_or_hub_file(path: str, repo_id: str, kwarg: str) -> Path:
    """``path`` if it is a local file, else the file of that name in hub repo ``repo_id``; a clear error otherwise
    (``kwarg``: the config key to set, e.g. ``reward.kwargs.hpsv2.checkpoint``)."""
    local = Path(path).expanduser()
    if local.is_file():
        return local
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, path))
    except Exception as error:
        raise FileNotFoundError(
            f"{path!r} is not a local file and could not be fetched from {repo_id!r} ({type(error).__name__}). "
            f"Download it and pass its path as {kwarg}."
        ) from None


def load_aesthetic_head(path: str) -> AestheticHead:
    """The head's weights from ``.safetensors`` or the published ``.pth`` state dict (loaded with weights_only)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(
            f"aesthetic head weights {path!r} not found; download sac+logos+ava1-l14-linearMSE.pth (LAION's improved "
            "aesthetic predictor) and pass its path as reward.kwargs.aesthetic.head_path."
        )
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(file)
    else:
        state = torch.load(file, map_location="cpu", weights_only=True)
    head = AestheticHead(embed_dim=state["layers.0.weight"].shape[1])
    head.load_state_dict(state)
    return head.eval().requires_grad_(False)


def aesthetic(
    model_dir: str = "openai/clip-vit-large-patch14",
    head_path: str = "sac+logos+ava1-l14-linearMSE.pth",
    device: str = "cpu",
    batch_size: int = 32,
) -> Reward:
    """LAION aesthetic score (about 1-10) of each image: the MLP head on the CLIP image embedding."""
    scorer = ClipScorer.load(model_dir, device=device)
    head = load_aesthetic_head(head_path).to(scorer.device)

    def score(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return head(scorer.image_embeds(images)).squeeze(1)

    def aesthetic(images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        return _batched(score, images, prompts, batch_size)

    return aesthetic


def pickscore(
    model_dir: str = "yuvalkirstain/PickScore_v1",
    processor_dir: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    device: str = "cpu",
    batch_size: int = 32,
) -> Reward:
    """PickScore: ``logit_scale.exp() * cos(text, image)`` of a CLIP-H model fine-tuned on Pick-a-Pic (about 15-25)."""
    scorer = ClipScorer.load(model_dir, processor_dir, device=device)

    def score(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        cos = (scorer.image_embeds(images) * scorer.text_embeds(prompts)).sum(dim=-1)
        return scorer.model.logit_scale.exp().float() * cos

    def pickscore(images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        return _batched(score, images, prompts, batch_size)

    return pickscore


def clipscore(
    model_dir: str = "openai/clip-vit-large-patch14", weight: float = 2.5, device: str = "cpu", batch_size: int = 32
) -> Reward:
    """CLIPScore (Hessel et al. 2021): ``weight * max(cos(text, image), 0)``."""
    scorer = ClipScorer.load(model_dir, device=device)

    def score(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return weight * (scorer.image_embeds(images) * scorer.text_embeds(prompts)).sum(dim=-1).clamp(min=0)

    def clipscore(images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        return _batched(score, images, prompts, batch_size)

    return clipscore
