"""The FLUX.1 policy (rectified flow, ``FluxTransformer2DModel``) with LoRA via peft: the same surface as the SD
policy, so the rollout, the trainers and evaluation run unchanged.

Latents live packed, as ``FluxPipeline`` keeps them: ``[B, (h/2)(w/2), 4C]`` (2x2 patches). Steps follow the
pipeline's schedule: sigmas ``linspace(1, 1/T, T)`` shifted by ``FlowMatchEulerDiscreteScheduler`` with the
resolution-dependent ``mu`` (``calculate_shift``), then a final 0. Guidance: a model with a guidance embedding
(FLUX.1-dev) gets ``guidance_scale`` through it; a model without one gets true classifier-free guidance against the
empty prompt (both halves in one batch).
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.utils.torch_utils import randn_tensor

from diffrl.config import LoraConfig, ModelConfig
from diffrl.policies.common import LoraModel, pipeline_dtype, resolve_model_path
from diffrl.policies.flow_steps import FlowSchedule, FlowSteps


class FluxPolicy(FlowSteps, LoraModel):
    family = "flux"
    pipeline_class = FluxPipeline
    component = "transformer"

    def __init__(
        self,
        pipeline: FluxPipeline,
        lora: LoraConfig | None,
        device: torch.device | str,
        resolution: int = 0,
        max_sequence_length: int = 0,
    ):
        self.device = torch.device(device)
        for encoder in (pipeline.vae, pipeline.text_encoder, pipeline.text_encoder_2):
            encoder.to(self.device).requires_grad_(False).eval()
        self.pipeline = pipeline  # its encode_prompt, packing and latent ids are used as they are
        self.vae = pipeline.vae
        self.transformer = pipeline.transformer.to(self.device)
        self.denoiser = self.transformer  # what forward passes call; a trainer may swap in a DDP-wrapped model
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipeline.scheduler.config)
        self.max_sequence_length = max_sequence_length or min(pipeline.tokenizer_2.model_max_length, 512)
        self.guidance_embeds = bool(self.transformer.config.guidance_embeds)
        self._setup_training(self.transformer, lora)
        self.vae_scale_factor = pipeline.vae_scale_factor
        sample_size = self.vae.config.sample_size  # FLUX.1's autoencoder: 1024
        self.resolution = resolution or (sample_size if isinstance(sample_size, int) else sample_size[0])
        side = 2 * (self.resolution // (self.vae_scale_factor * 2))  # latent side, even for 2x2 packing
        self.latent_channels = self.transformer.config.in_channels // 4
        self.latent_side = side
        self.latent_image_ids = FluxPipeline._prepare_latent_image_ids(
            1, side // 2, side // 2, self.device, self.dtype
        )
        self._prompt_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._schedules: dict[int, FlowSchedule] = {}

    def pipeline_kwargs(self, num_steps: int, guidance_scale: float) -> dict:
        """Keyword arguments of a plain ``FluxPipeline`` call that draws this policy's ODE samples (with the adapter
        loaded with ``load_lora_weights`` and one ``torch.Generator().manual_seed(seed)`` per prompt): the
        resolution and T5 length it samples at, and its guidance: through the guidance embedding (FLUX.1-dev) or,
        for a model without one, true classifier-free guidance against the empty prompt."""
        kwargs = {
            "num_inference_steps": num_steps,
            "height": self.resolution,
            "width": self.resolution,
            "max_sequence_length": self.max_sequence_length,
        }
        if self.guidance_embeds:
            return {**kwargs, "guidance_scale": guidance_scale}
        if guidance_scale == 1.0:
            return kwargs
        return {**kwargs, "true_cfg_scale": guidance_scale, "negative_prompt": ""}

    @classmethod
    def load(cls, model: ModelConfig, lora: LoraConfig, device: torch.device | str = "cpu") -> FluxPolicy:
        """Load a FLUX.1-layout model from a local directory or a hub id and add LoRA (unless full fine-tune)."""
        path = resolve_model_path(model.path, "flux")
        pipeline = FluxPipeline.from_pretrained(path, revision=model.revision, **pipeline_dtype(model.dtype))
        policy = cls(
            pipeline, None if model.full_finetune else lora, device, model.resolution, model.max_sequence_length
        )
        policy._apply_options(model)
        return policy

    # ------------------------------------------------------------------------------------------------------------
    # sampling surface

    def schedule(self, num_steps: int) -> FlowSchedule:
        if num_steps not in self._schedules:
            config = self.scheduler.config
            mu = calculate_shift(
                (self.latent_side // 2) ** 2,
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", 1.15),
            )
            sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
            if config.get("use_flow_sigmas", False):
                sigmas = None
            self.scheduler.set_timesteps(num_steps, device=self.device, sigmas=sigmas, mu=mu)
            self._schedules[num_steps] = FlowSchedule(
                self.scheduler.sigmas.to("cpu", torch.float32), self.scheduler.timesteps.to(self.device)
            )
        return self._schedules[num_steps]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(T5 hidden states ``[B, L, D]``, pooled CLIP embedding ``[B, P]``), cached per prompt."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if missing:
            embeds, pooled, _ = self.pipeline.encode_prompt(
                prompt=missing, prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length
            )
            self._prompt_cache.update(zip(missing, zip(embeds, pooled, strict=True), strict=True))
        embeds, pooled = zip(*(self._prompt_cache[p] for p in prompts), strict=True)
        return torch.stack(embeds), torch.stack(pooled)

    def initial_latents(self, generators: list[torch.Generator]) -> torch.Tensor:
        """Packed ``x_1 ~ N(0, I)``, one generator per sample, drawn as ``FluxPipeline.prepare_latents`` does."""
        side, channels = self.latent_side, self.latent_channels
        noise = randn_tensor(
            (len(generators), channels, side, side), generator=generators, device=self.device, dtype=torch.float32
        )
        return FluxPipeline._pack_latents(noise, len(generators), channels, side, side)

    def predict(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: tuple[torch.Tensor, torch.Tensor],
        guidance_scale: float,
    ) -> torch.Tensor:
        """The predicted velocity at packed ``latents`` after guidance, float32 ``[B, N, 4C]``."""
        embeds, pooled = prompt_embeds
        batch, dtype = latents.shape[0], self.dtype
        t = torch.as_tensor(timesteps, device=self.device).expand(batch).to(dtype) / 1000
        text_ids = torch.zeros(embeds.shape[1], 3, device=self.device, dtype=dtype)
        if self.guidance_embeds:
            guidance = torch.full((batch,), guidance_scale, device=self.device, dtype=torch.float32)
            return self._forward(latents.to(dtype), t, guidance, embeds, pooled, text_ids).float()

        def without_guidance_embedding(x, timestep, hidden, pooled_embeds):
            return self._forward(x, timestep, None, hidden, pooled_embeds, text_ids)

        return self.guided(without_guidance_embedding, latents, t, prompt_embeds, guidance_scale)

    def _forward(self, latents, t, guidance, embeds, pooled, text_ids) -> torch.Tensor:
        return self.denoiser(
            hidden_states=latents,
            timestep=t,
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=embeds,
            txt_ids=text_ids,
            img_ids=self.latent_image_ids,
            return_dict=False,
        )[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Packed latents -> images ``[B, 3, H, W]`` float32 in [0, 1], differentiable (samplers call it under
        no_grad)."""
        unpacked = FluxPipeline._unpack_latents(latents, self.resolution, self.resolution, self.vae_scale_factor)
        scaled = unpacked / self.vae.config.scaling_factor + self.vae.config.shift_factor
        return (self.vae.decode(scaled.to(self.vae.dtype)).sample.float() / 2 + 0.5).clamp(0, 1)
