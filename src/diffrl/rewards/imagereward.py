"""ImageReward (Xu et al. 2023) scored in-process with transformers' BLIP, without the ``image-reward`` package.

The official checkpoint (``ImageReward.pt``) holds BLIP's ViT-L/16 (``blip.visual_encoder``), its BERT text
encoder with cross-attention to the image (``blip.text_encoder``) and an MLP head (``mlp.layers``). We map these
keys onto transformers' ``BlipVisionModel`` and ``BlipTextModel`` (the same architecture: transformers' BLIP was
ported from the same code), and compute, as the package's ``ImageReward.score`` does:

1. image embeddings ``[B, 1 + N, 1024]`` of the CLIP-normalised 224x224 image;
2. the text encoder on the prompt (BERT tokens, padded to 35) cross-attending to them; the first token's state;
3. the MLP head, then ``(r - 0.16717362830052426) / 1.0333394966054072``.

The tokenizer is BERT's (``bert-base-uncased``) from a local directory or hub id: the package downloads it at
construction, we load it from wherever the user keeps it.
"""

from __future__ import annotations

import re

import torch

from diffrl.rewards.clip import AestheticHead, _batched, clip_preprocess, local_or_hub_file
from diffrl.rewards.combine import Reward

REWARD_MEAN, REWARD_STD = 0.16717362830052426, 1.0333394966054072
MAX_TEXT_TOKENS = 35

_VISION = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}
_VISION_BLOCK = re.compile(r"^blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)$")
_VISION_BLOCK_PARTS = {
    "norm1": "layer_norm1",
    "norm2": "layer_norm2",
    "attn.qkv": "self_attn.qkv",
    "attn.proj": "self_attn.projection",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


def split_checkpoint(state: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """An ImageReward state dict -> (``BlipVisionModel``, ``BlipTextModel``, MLP head) state dicts.

    BLIP's text encoder already uses transformers' BERT names; the vision keys are renamed; the contrastive
    projections and anything else the score does not use are left out.
    """
    vision, text, head = {}, {}, {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key.startswith("blip.visual_encoder."):
            name = key.removeprefix("blip.visual_encoder.")
            if name in _VISION:
                vision[_VISION[name]] = value
            elif match := _VISION_BLOCK.match(name):
                index, part, param = match.groups()
                vision[f"encoder.layers.{index}.{_VISION_BLOCK_PARTS[part]}.{param}"] = value
            else:
                raise KeyError(f"ImageReward key {key!r} has no BlipVisionModel counterpart.")
        elif key.startswith("blip.text_encoder."):
            name = key.removeprefix("blip.text_encoder.")
            if not name.startswith("pooler.") and not name.endswith("position_ids"):
                text[name] = value
        elif key.startswith("mlp."):
            head[key.removeprefix("mlp.")] = value
    if not vision or not text or not head:
        raise ValueError(
            "this is not an ImageReward checkpoint: it needs blip.visual_encoder.*, blip.text_encoder.* and mlp.* "
            "keys."
        )
    return vision, text, head


def blip_configs(vision: dict, text: dict, vision_heads: int | None = None, text_heads: int | None = None):
    """Vision and text configs read off the weights' shapes (heads: width / 64 unless given, as in ViT-L and BERT)."""
    from transformers import BlipTextConfig, BlipVisionConfig

    width = vision["embeddings.class_embedding"].shape[-1]
    patch = vision["embeddings.patch_embedding.weight"].shape[-1]
    num_patches = vision["embeddings.position_embedding"].shape[1] - 1
    vision_config = BlipVisionConfig(
        hidden_size=width,
        intermediate_size=vision["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=1 + max(int(k.split(".")[2]) for k in vision if k.startswith("encoder.layers.")),
        num_attention_heads=vision_heads or width // 64,
        image_size=round(num_patches**0.5) * patch,
        patch_size=patch,
        hidden_act="gelu",
        layer_norm_eps=1e-6,  # BLIP's ViT
    )
    hidden = text["embeddings.word_embeddings.weight"].shape[1]
    text_config = BlipTextConfig(
        vocab_size=text["embeddings.word_embeddings.weight"].shape[0],
        hidden_size=hidden,
        encoder_hidden_size=text["encoder.layer.0.crossattention.self.key.weight"].shape[1],
        intermediate_size=text["encoder.layer.0.intermediate.dense.weight"].shape[0],
        num_hidden_layers=1 + max(int(k.split(".")[2]) for k in text if k.startswith("encoder.layer.")),
        num_attention_heads=text_heads or hidden // 64,
        max_position_embeddings=text["embeddings.position_embeddings.weight"].shape[0],
        hidden_act="gelu",
        layer_norm_eps=1e-12,
    )
    return vision_config, text_config


def _load_into(model: torch.nn.Module, state: dict, what: str) -> torch.nn.Module:
    expected = {k for k in model.state_dict() if not k.endswith("position_ids")}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"ImageReward {what} weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}.")
    model.load_state_dict(state, strict=False)
    return model.eval().requires_grad_(False)


def load_imagereward_checkpoint(checkpoint: str, repo_id: str = "THUDM/ImageReward") -> dict[str, torch.Tensor]:
    path = local_or_hub_file(checkpoint, repo_id, "reward.kwargs.imagereward.checkpoint")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state)


class ImageRewardScorer(torch.nn.Module):
    """BLIP vision + text encoders and the ImageReward head; ``forward(pixels, input_ids, attention_mask)``."""

    def __init__(self, state: dict[str, torch.Tensor], vision_heads: int | None = None, text_heads: int | None = None):
        from transformers import BlipTextModel, BlipVisionModel

        super().__init__()
        vision, text, head = split_checkpoint(state)
        vision_config, text_config = blip_configs(vision, text, vision_heads, text_heads)
        self.image_size = vision_config.image_size
        self.vision = _load_into(BlipVisionModel(vision_config), vision, "vision")
        self.text = _load_into(BlipTextModel(text_config, add_pooling_layer=False), text, "text")
        self.head = AestheticHead(embed_dim=text_config.hidden_size)  # the same MLP layout as the LAION head
        self.head.load_state_dict(head)
        self.head.eval().requires_grad_(False)

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        image_embeds = self.vision(pixel_values=pixels).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        states = self.text(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
        ).last_hidden_state
        return (self.head(states[:, 0].float()).squeeze(1) - REWARD_MEAN) / REWARD_STD


def imagereward(
    checkpoint: str = "ImageReward.pt",
    tokenizer_dir: str = "bert-base-uncased",
    repo_id: str = "THUDM/ImageReward",
    device: str = "cpu",
    batch_size: int = 32,
    vision_heads: int | None = None,
    text_heads: int | None = None,
) -> Reward:
    """ImageReward v1.0 (about -2 to 2; normalised so its training set has mean 0, std 1).

    ``vision_heads`` / ``text_heads`` are only for non-standard sizes (default: width / 64, as in the release).
    """
    from transformers import BertTokenizer

    state = load_imagereward_checkpoint(checkpoint, repo_id)
    scorer = ImageRewardScorer(state, vision_heads, text_heads).to(device)
    tokenizer = BertTokenizer.from_pretrained(tokenizer_dir)

    def score(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        tokens = tokenizer(
            prompts, padding="max_length", truncation=True, max_length=MAX_TEXT_TOKENS, return_tensors="pt"
        ).to(device)
        pixels = clip_preprocess(images.to(device), scorer.image_size)
        return scorer(pixels, tokens.input_ids, tokens.attention_mask)

    def imagereward(images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        return _batched(score, images, prompts, batch_size)

    return imagereward
