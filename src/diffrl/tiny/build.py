"""Components of the embedded tiny Stable Diffusion, built from configs (random weights until pretrained).

The layout is real SD's, scaled down: a 4x ``AutoencoderKL`` (64x64x3 -> 16x16x4, so that an object of the
shapes world spans three to five latent cells), an epsilon-prediction ``UNet2DConditionModel`` on SD's
scaled-linear schedule, a small ``CLIPTextModel`` and a ``CLIPTokenizer`` whose
vocabulary is the shapes grammar's words. :func:`save_pipeline` writes them in diffusers' folder layout, so that
``StableDiffusionPipeline.from_pretrained(<dir>)`` loads the model exactly as it loads SD1.5.

The FLUX.1 builders (:func:`build_flux_transformer`, :func:`build_t5_encoder`, :func:`flux_pipeline`) make the same
kind of model in FLUX's layout, for ``FluxPipeline.from_pretrained(<dir>)``.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

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
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        mid_block_add_attention=False,
    )


def build_unet() -> UNet2DConditionModel:
    """16x16 latents through four levels (16, 8, 4, 2); the text is attended to at 8x8 and 4x4, where the layout
    is decided, and the 16x16 level is convolutional only (it costs what the 8x8 level of a twice-as-wide UNet
    does)."""
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 128, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def build_scheduler(zero_terminal_snr: bool = False) -> DDIMScheduler:
    """SD1.5's noise schedule (scaled-linear betas, 1,000 steps, epsilon prediction) with a DDIM sampler.

    ``zero_terminal_snr``: the same betas rescaled so that the last timestep is pure noise, with v-prediction and
    trailing timesteps (sampling starts at t = 999), as Lin et al. (2024) fix SD's schedule. On SD1.5's own
    schedule a training sample at t = 951, where 20-step sampling starts, still carries 9% of the clean latent, so the
    model learns to read the scene's colours and places from what is in fact the initial noise.
    """
    if zero_terminal_snr:
        extra = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}
    else:
        extra = {"prediction_type": "epsilon"}
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        **extra,
    )


def save_pipeline(
    directory: Path,
    *,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    unet: UNet2DConditionModel,
    scheduler: DDIMScheduler | None = None,
    dtype: torch.dtype = torch.float16,
) -> None:
    """Save in diffusers' layout as safetensors: the UNet and VAE in ``dtype`` (diffusers loads them as float32
    unless asked otherwise), the text encoder in float32 (transformers loads a checkpoint in its saved dtype)."""
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler or build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    unet.to(dtype)
    vae.to(dtype)
    text_encoder.to(torch.float32)
    pipeline.save_pretrained(directory, safe_serialization=True)


# --------------------------------------------------------------------------------------------------------------------
# FLUX.1 architecture, tiny


def build_t5_encoder(tokenizer, dim: int = TEXT_DIM) -> T5EncoderModel:
    """A small T5 encoder (FLUX's second text encoder) over the same vocabulary."""
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=dim,
        d_kv=dim // 4,
        d_ff=2 * dim,
        num_layers=2,
        num_heads=4,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config)


def build_flux_transformer(
    *,
    latent_channels: int = 4,
    text_dim: int = TEXT_DIM,
    pooled_dim: int = TEXT_DIM,
    num_layers: int = 2,
    num_single_layers: int = 4,
    heads: int = 4,
    head_dim: int = 32,
    guidance_embeds: bool = False,
) -> FluxTransformer2DModel:
    """``FluxTransformer2DModel`` in FLUX.1's layout (double- then single-stream blocks, 3-axis RoPE), small."""
    rope_y = rope_x = 3 * head_dim // 8
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * latent_channels,  # 2x2 packed latents
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=text_dim,
        pooled_projection_dim=pooled_dim,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(head_dim - rope_y - rope_x, rope_y, rope_x),
    )


def build_flow_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1's scheduler settings: resolution-dependent shift between base_shift and max_shift."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def flux_pipeline(
    *, vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer, text_encoder_2, tokenizer_2, transformer
) -> FluxPipeline:
    """A ``FluxPipeline`` of the given parts. FLUX decodes ``latents / scaling_factor + shift_factor``: a VAE
    without a shift gets 0."""
    if vae.config.shift_factor is None:
        vae.register_to_config(shift_factor=0.0)
    return FluxPipeline(
        scheduler=build_flow_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
