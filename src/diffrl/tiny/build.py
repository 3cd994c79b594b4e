"""Components of the embedded tiny Stable Diffusion, built from configs (random weights until pretrained).

The layout is real SD's, scaled down: an 8x ``AutoencoderKL`` (64x64x3 -> 8x8x4), an epsilon-prediction
``UNet2DConditionModel`` on SD's scaled-linear schedule, a small ``CLIPTextModel`` and a ``CLIPTokenizer`` whose
vocabulary is the shapes grammar's words. :func:`save_pipeline` writes them in diffusers' folder layout, so that
``StableDiffusionPipeline.from_pretrained(<dir>)`` loads the model exactly as it loads SD1.5.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from diffrl.tiny.world import COLORS, COUNT_WORDS, RELATIONS, SHAPES

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_TOKENS = 16  # the longest prompt has 9 words; plus start and end tokens
TEXT_DIM = 64


def grammar_words() -> list[str]:
    words = {"a", "and", *COLORS, *SHAPES, *(s + "s" for s in SHAPES), *COUNT_WORDS.values()}
    words |= {w for relation in RELATIONS for w in relation.split()}
    return sorted(words)


def write_tokenizer_files(directory: Path) -> None:
    """``vocab.json`` and ``merges.txt`` of a CLIP BPE tokenizer whose words are the grammar's.

    The merges are learned by byte-pair encoding on the grammar's words themselves (merge the most frequent adjacent
    pair, ties broken alphabetically, until every word is one token), so every grammar word encodes as a single
    token while any other lowercase word still encodes, as letters and pieces.
    """
    words = grammar_words()
    segmentations = [[*w[:-1], w[-1] + "</w>"] for w in words]
    letters = sorted({c for w in words for c in w})
    vocab: dict[str, int] = {}
    for token in [*letters, *(c + "</w>" for c in letters)]:
        vocab.setdefault(token, len(vocab))
    merges: list[tuple[str, str]] = []
    while any(len(seg) > 1 for seg in segmentations):
        counts: dict[tuple[str, str], int] = {}
        for seg in segmentations:
            for pair in itertools.pairwise(seg):
                counts[pair] = counts.get(pair, 0) + 1
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        vocab.setdefault(best[0] + best[1], len(vocab))
        for i, seg in enumerate(segmentations):
            merged, j = [], 0
            while j < len(seg):
                if j + 1 < len(seg) and (seg[j], seg[j + 1]) == best:
                    merged.append(seg[j] + seg[j + 1])
                    j += 2
                else:
                    merged.append(seg[j])
                    j += 1
            segmentations[i] = merged
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, indent=1))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def build_tokenizer(directory: Path) -> CLIPTokenizer:
    write_tokenizer_files(directory)
    return CLIPTokenizer.from_pretrained(
        directory,
        model_max_length=MAX_TOKENS,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=EOS,
    )


def build_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_DIM,
        intermediate_size=4 * TEXT_DIM,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        mid_block_add_attention=False,
    )


def build_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 128, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def build_scheduler() -> DDIMScheduler:
    """SD1.5's noise schedule (scaled-linear betas, 1,000 steps, epsilon prediction) with a DDIM sampler."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


def save_pipeline(
    directory: Path,
    *,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    unet: UNet2DConditionModel,
    dtype: torch.dtype = torch.float16,
) -> None:
    """Save in diffusers' layout as safetensors: the UNet and VAE in ``dtype`` (diffusers loads them as float32
    unless asked otherwise), the text encoder in float32 (transformers loads a checkpoint in its saved dtype)."""
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    unet.to(dtype)
    vae.to(dtype)
    text_encoder.to(torch.float32)
    pipeline.save_pretrained(directory, safe_serialization=True)
