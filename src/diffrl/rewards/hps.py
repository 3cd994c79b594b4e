"""HPS v2 / v2.1 (Wu et al. 2023): an open_clip ViT-H-14 fine-tuned on human preferences, run on transformers.

The published checkpoints (``HPS_v2_compressed.pt``, ``HPS_v2.1_compressed.pt``) are open_clip state dicts. We map
their keys onto transformers' ``CLIPModel`` (the same architecture: pre-LN transformer, GELU, patch 14, EOT
pooling), so neither open_clip (which needs torchvision) nor the ``hpsv2`` package is needed. The score is the
cosine similarity of the normalised image and text embeddings, as in hpsv2's ``img_score.score`` (about 0.2-0.35).
Preprocessing is open_clip's validation transform for this model (bicubic resize of the short side to 224,
centre crop, OpenAI CLIP mean and std), done on tensors by :func:`diffrl.rewards.clip.clip_preprocess`.
"""

from __future__ import annotations

import re

import torch

from diffrl.rewards.clip import ClipScorer, _batched, local_or_hub_file
from diffrl.rewards.combine import Reward

_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
_BLOCK_PARTS = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_SINGLE = {
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_PROJECTIONS = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_IGNORED = {"attn_mask"}  # open_clip's causal-mask buffer; CLIPTextModel builds its own


def open_clip_to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An open_clip CLIP (ViT) state dict -> ``CLIPModel`` keys. Raises on a key it does not know."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key in _IGNORED:
            continue
        if key in _SINGLE:
            out[_SINGLE[key]] = value
        elif key in _PROJECTIONS:  # open_clip multiplies x @ proj; nn.Linear computes x @ weight.T
            out[_PROJECTIONS[key]] = value.t().contiguous()
        elif match := _BLOCK.match(key):
            tower = "vision_model" if match.group(1) else "text_model"
            prefix, rest = f"{tower}.encoder.layers.{match.group(2)}.", match.group(3)
            if rest.startswith("attn.in_proj_"):  # q, k, v stacked along dim 0
                kind = rest.removeprefix("attn.in_proj_")
                for name, part in zip(("q", "k", "v"), value.chunk(3, dim=0), strict=True):
                    out[f"{prefix}self_attn.{name}_proj.{kind}"] = part.contiguous()
                continue
            module, _, param = rest.rpartition(".")
            if module not in _BLOCK_PARTS:
                raise KeyError(f"open_clip key {key!r} has no CLIPModel counterpart (unsupported architecture).")
            out[f"{prefix}{_BLOCK_PARTS[module]}.{param}"] = value
        else:
            raise KeyError(f"open_clip key {key!r} has no CLIPModel counterpart (unsupported architecture).")
    return out


def load_hps_checkpoint(checkpoint: str, repo_id: str = "xswu/HPSv2") -> dict[str, torch.Tensor]:
    """The open_clip state dict of an HPS checkpoint: a local file, else ``checkpoint`` from hub repo ``repo_id``."""
    path = local_or_hub_file(checkpoint, repo_id, "reward.kwargs.hpsv2.checkpoint")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def load_hps_model(checkpoint: str, clip_dir: str, repo_id: str = "xswu/HPSv2", dtype=torch.float32):
    """A ``CLIPModel`` with ``clip_dir``'s config (a ViT-H-14 CLIP folder or hub id) and the HPS weights."""
    from transformers import CLIPConfig, CLIPModel

    state = open_clip_to_transformers(load_hps_checkpoint(checkpoint, repo_id))
    with torch.device("meta"):
        model = CLIPModel(CLIPConfig.from_pretrained(clip_dir))
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"HPS checkpoint {checkpoint!r} does not fit the CLIP config in {clip_dir!r}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}. Use the ViT-H-14 config (laion/CLIP-ViT-H-14-laion2B-s32B-b79K)."
        )
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)
    # buffers the checkpoint does not hold (position ids) are rebuilt on a real device
    for tower in (model.vision_model, model.text_model):
        ids = torch.arange(tower.embeddings.position_embedding.num_embeddings).unsqueeze(0)
        tower.embeddings.register_buffer("position_ids", ids, persistent=False)
    return model


def hpsv2(
    checkpoint: str = "HPS_v2.1_compressed.pt",
    clip_dir: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    repo_id: str = "xswu/HPSv2",
    device: str = "cpu",
    batch_size: int = 32,
) -> Reward:
    """HPS v2.1 (or v2 with ``checkpoint="HPS_v2_compressed.pt"``): cosine of image and prompt embeddings.

    ``clip_dir`` supplies the model config, the tokenizer and the image size (a local copy of the ViT-H-14 CLIP
    folder, or its hub id); the weights come from ``checkpoint``.
    """
    from transformers import AutoTokenizer

    model = load_hps_model(checkpoint, clip_dir, repo_id)
    scorer = ClipScorer(model, AutoTokenizer.from_pretrained(clip_dir), clip_dir, device)

    def score(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return (scorer.image_embeds(images) * scorer.text_embeds(prompts)).sum(dim=-1)

    def hpsv2(images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        return _batched(score, images, prompts, batch_size)

    return hpsv2
