"""The Stable Diffusion XL policy (VP, epsilon or v prediction) with LoRA on the UNet via peft.

SDXL differs from SD1.x where the UNet is conditioned, and nowhere else: the schedule, the gDDIM steps and the
decode are :class:`~diffrl.policies.sd.SDPolicy`'s. Its prompt encoding is a pair, as
``StableDiffusionXLPipeline.encode_prompt`` computes it: the penultimate hidden states of both text encoders
(CLIP ViT-L and OpenCLIP bigG) side by side, ``[B, 77, 2048]``, and bigG's pooled projection ``[B, 1280]``. The
UNet also takes the micro-conditioning time ids ``(original size, crop top-left, target size)``, here the sampling
resolution with no crop, as the pipeline's defaults. Classifier-free guidance uses what the pipeline uses for an
absent negative prompt: zeros when the model's ``force_zeros_for_empty_prompt`` is set (SDXL base), else the empty
prompt's encoding. SDXL's VAE overflows in float16, so a VAE whose config asks for ``force_upcast`` stays float32
(``model.vae`` names a replacement, such as an fp16-fixed VAE, which then runs in ``model.dtype``).
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline

from diffrl.config import LoraConfig, ModelConfig
from diffrl.policies.common import pipeline_dtype, resolve_model_path
from diffrl.policies.sd import SDPolicy


class SDXLPolicy(SDPolicy):
    family = "sdxl"
    pipeline_class = StableDiffusionXLPipeline

    def __init__(
        self, pipeline: StableDiffusionXLPipeline, lora: LoraConfig | None, device: torch.device, resolution: int = 0
    ):
        if pipeline.vae.config.get("force_upcast", False) and pipeline.vae.dtype != torch.float32:
            pipeline.vae.to(torch.float32)  # as the pipeline upcasts it before decoding
        super().__init__(pipeline, lora, device, resolution)
        self.pipeline = pipeline  # its encode_prompt and time-id maths are used as they are
        self.text_encoder_2 = pipeline.text_encoder_2.to(self.device).requires_grad_(False).eval()
        self.force_zeros_for_empty_prompt = bool(pipeline.config.get("force_zeros_for_empty_prompt", False))
        side = self.resolution
        projection_dim = self.text_encoder_2.config.projection_dim
        time_ids = pipeline._get_add_time_ids((side, side), (0, 0), (side, side), torch.float32, projection_dim)
        self.time_ids = time_ids.to(self.device, self.dtype)  # [1, 6]

    @classmethod
    def load(cls, model: ModelConfig, lora: LoraConfig, device: torch.device | str = "cpu") -> SDXLPolicy:
        """Load an SDXL-layout model from a local directory or a hub id (with ``model.vae`` in place of its VAE when
        given) and add LoRA (unless full fine-tune)."""
        path = resolve_model_path(model.path, "sdxl")
        extra = {}
        if model.vae:
            local = Path(model.vae).expanduser()
            if model.vae.startswith((".", "/", "~")) and not (local / "config.json").is_file():
                raise FileNotFoundError(
                    f"model.vae {model.vae!r} is not a VAE folder (no config.json); give an AutoencoderKL folder or "
                    "a hub id such as madebyollin/sdxl-vae-fp16-fix."
                )
            extra["vae"] = AutoencoderKL.from_pretrained(model.vae, **pipeline_dtype(model.dtype))
        pipeline = StableDiffusionXLPipeline.from_pretrained(
            path, revision=model.revision, **pipeline_dtype(model.dtype), **extra
        )
        policy = cls(pipeline, None if model.full_finetune else lora, device, model.resolution)
        policy._apply_options(model)
        return policy

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(both encoders' hidden states ``[B, 77, D1 + D2]``, pooled projection ``[B, P]``), cached per prompt."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if missing:
            embeds, _, pooled, _ = self.pipeline.encode_prompt(
                prompt=missing, device=self.device, do_classifier_free_guidance=False
            )
            pairs = zip(embeds.to(self.dtype), pooled.to(self.dtype), strict=True)
            self._prompt_cache.update(zip(missing, pairs, strict=True))
        embeds, pooled = zip(*(self._prompt_cache[p] for p in prompts), strict=True)
        return torch.stack(embeds), torch.stack(pooled)

    @cached_property
    def negative_embeds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The unconditional half of classifier-free guidance, batch of one, as the pipeline forms it."""
        embeds, pooled = self.encode_prompts([""])
        if self.force_zeros_for_empty_prompt:
            return torch.zeros_like(embeds), torch.zeros_like(pooled)
        return embeds, pooled

    def predict(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: tuple[torch.Tensor, torch.Tensor],
        guidance_scale: float,
    ) -> torch.Tensor:
        """The model output at ``latents`` after classifier-free guidance, float32 ``[B, C, h, w]``; the
        unconditional and conditional halves run as one batch."""
        timesteps = torch.as_tensor(timesteps, device=self.device).expand(latents.shape[0])
        return self.guided(self._forward, latents, timesteps, prompt_embeds, guidance_scale)

    def _forward(self, latents, timesteps, embeds, pooled) -> torch.Tensor:
        conditions = {"text_embeds": pooled, "time_ids": self.time_ids.expand(latents.shape[0], -1)}
        return self.denoiser(latents, timesteps, embeds, added_cond_kwargs=conditions).sample
