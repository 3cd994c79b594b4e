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
    from random_models import save_random_sd

    return save_random_sd(tmp_path_factory.mktemp("random_sd"))


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


def build_random_sdxl(directory: Path, *, force_zeros_for_empty_prompt: bool = True) -> Path:
    """A tiny Stable Diffusion XL with random weights in diffusers' layout: both CLIP text encoders (the second
    with a projection, giving the pooled embedding), a UNet with SDXL's text-and-time added conditioning, and
    SDXL's Euler scheduler config; 32 px images (a 4x VAE and 8x8 latents)."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from diffrl.tiny.build import MAX_TOKENS, build_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tokenizer(directory / "tokenizer_src")

    def clip(hidden: int) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=MAX_TOKENS, projection_dim=hidden,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip

    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1), cross_attention_dim=32 + 32,
        projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=8,
    )  # fmt: skip
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 32), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=32, scaling_factor=0.13025,
    )  # fmt: skip
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )
    pipeline = StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(clip(32)), text_encoder_2=CLIPTextModelWithProjection(clip(32)),
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
    )  # fmt: skip
    pipeline.save_pretrained(directory / "model", safe_serialization=True)
    return directory / "model"


@pytest.fixture(scope="session")
def random_sdxl_dir(tmp_path_factory) -> Path:
    """A tiny random SDXL whose unconditional half is zeros, as SDXL base (force_zeros_for_empty_prompt)."""
    return build_random_sdxl(tmp_path_factory.mktemp("random_sdxl"))


@pytest.fixture(scope="session")
def random_sdxl_empty_prompt_dir(tmp_path_factory) -> Path:
    """A tiny random SDXL whose unconditional half encodes the empty prompt."""
    return build_random_sdxl(tmp_path_factory.mktemp("random_sdxl_empty"), force_zeros_for_empty_prompt=False)


def build_random_sd3(directory: Path) -> Path:
    """A tiny SD3-architecture pipeline with random weights in diffusers' layout: CLIP-L and CLIP-G stand-ins with
    projections (their pooled embeddings side by side), a small T5, a one-block MMDiT and SD3's shifted flow
    schedule; 32 px images (a 4x VAE with shift and scale, 8x8 latents in 2x2 patches)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from diffrl.tiny.build import MAX_TOKENS, build_t5_encoder, build_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tokenizer(directory / "tokenizer_src")

    def clip() -> CLIPTextModelWithProjection:
        return CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=MAX_TOKENS, projection_dim=32,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )  # fmt: skip

    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=64, pooled_projection_dim=64,
    )  # fmt: skip
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 32), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=32, shift_factor=0.06, scaling_factor=1.5,
        use_quant_conv=False, use_post_quant_conv=False,
    )  # fmt: skip
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=clip(), tokenizer=tokenizer, text_encoder_2=clip(), tokenizer_2=tokenizer,
        text_encoder_3=build_t5_encoder(tokenizer, dim=64), tokenizer_3=tokenizer,
    )  # fmt: skip
    pipeline.save_pretrained(directory / "model", safe_serialization=True)
    return directory / "model"


@pytest.fixture(scope="session")
def random_sd3_dir(tmp_path_factory) -> Path:
    """A tiny random SD3 (three text encoders, T5 included)."""
    return build_random_sd3(tmp_path_factory.mktemp("random_sd3"))
