"""The Stable Diffusion policy (SD1.x/2.x layout, epsilon or v prediction) with LoRA via peft.

A small duck-typed surface that the rollout, the trainers and evaluation use without knowing the model family:
``schedule``, ``encode_prompts``, ``initial_latents``, ``predict``, ``step``, ``decode``, ``trainable_parameters``,
``reference`` (the policy with LoRA disabled), ``save_adapter`` / ``load_adapter``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor

from diffrl.config import LoraConfig, ModelConfig
from diffrl.policies.common import LoraModel, pipeline_dtype, resolve_model_path
from diffrl.sampling.common import StepOutput, per_sample
from diffrl.sampling.gddim import gddim_step, to_x0_eps


@dataclass(frozen=True)
class SDSchedule:
    """The DDIM timesteps of ``num_steps`` steps, as diffusers' pipeline walks them: ``[T]`` each, on the host (the
    step maths reads them there, without a device synchronisation), and the model's timestep input on the device."""

    timesteps: torch.Tensor
    prev_timesteps: torch.Tensor
    model_timesteps: torch.Tensor

    def __len__(self) -> int:
        return len(self.timesteps)


class SDPolicy(LoraModel):
    family = "sd"
    pipeline_class = StableDiffusionPipeline
    component = "unet"

    def __init__(
        self, pipeline: StableDiffusionPipeline, lora: LoraConfig | None, device: torch.device, resolution: int = 0
    ):
        self.device = torch.device(device)
        self.vae = pipeline.vae.to(self.device).requires_grad_(False).eval()
        self.text_encoder = pipeline.text_encoder.to(self.device).requires_grad_(False).eval()
        self.tokenizer = pipeline.tokenizer
        self.unet = pipeline.unet.to(self.device)
        self.denoiser = self.unet  # what forward passes call; a trainer may swap in a DDP-wrapped unet
        # gDDIM never clips the predicted clean sample; a DDIM scheduler built for a plain pipeline must not either
        # (a config without the key, as SDXL's Euler configs may be, defaults to clipping)
        self.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config, clip_sample=False)
        self.prediction_type = self.scheduler.config.prediction_type
        self.alphas_cumprod = self.scheduler.alphas_cumprod.cpu()  # on the host: see SDSchedule
        self.final_alpha_cumprod = float(self.scheduler.final_alpha_cumprod)
        self._setup_training(self.unet, lora)
        self._prompt_cache: dict[str, torch.Tensor] = {}
        self._schedules: dict[int, SDSchedule] = {}
        vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        latent_size = resolution // vae_scale_factor if resolution else self.unet.config.sample_size
        self.latent_shape = (self.unet.config.in_channels, latent_size, latent_size)
        self.resolution = latent_size * vae_scale_factor

    def pipeline_kwargs(self, num_steps: int, guidance_scale: float) -> dict:
        """Keyword arguments of a plain ``StableDiffusionPipeline`` call that draws this policy's ODE samples (with
        ``pipeline.scheduler = DDIMScheduler.from_config(policy.scheduler.config)``, the adapter loaded with
        ``load_lora_weights`` and one ``torch.Generator().manual_seed(seed)`` per prompt)."""
        side = self.resolution
        return {"num_inference_steps": num_steps, "guidance_scale": guidance_scale, "eta": 0.0, "height": side,
                "width": side}  # fmt: skip

    @classmethod
    def load(cls, model: ModelConfig, lora: LoraConfig, device: torch.device | str = "cpu") -> SDPolicy:
        """Load an SD1.x/2.x-layout model from a local directory or a hub id and add LoRA (unless full fine-tune)."""
        path = resolve_model_path(model.path, "sd")
        pipeline = StableDiffusionPipeline.from_pretrained(
            path,
            revision=model.revision,
            **pipeline_dtype(model.dtype),
            safety_checker=None,
            requires_safety_checker=False,
        )
        policy = cls(pipeline, None if model.full_finetune else lora, device, model.resolution)
        policy._apply_options(model)
        return policy

    # ------------------------------------------------------------------------------------------------------------
    # sampling surface

    def schedule(self, num_steps: int) -> SDSchedule:
        if num_steps not in self._schedules:
            self.scheduler.set_timesteps(num_steps)
            timesteps = self.scheduler.timesteps.cpu().clone()
            # diffusers' DDIMScheduler.step: previous timestep = t - num_train_timesteps // num_steps
            prev = timesteps - self.scheduler.config.num_train_timesteps // num_steps
            self._schedules[num_steps] = SDSchedule(timesteps, prev, timesteps.to(self.device))
        return self._schedules[num_steps]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text-encoder hidden states ``[B, L, D]``, cached per prompt (the text encoder is frozen)."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if missing:
            ids = self.tokenizer(
                missing,
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(self.device)
            embeds = self.text_encoder(ids)[0].to(self.dtype)
            self._prompt_cache.update(zip(missing, embeds, strict=True))
        return torch.stack([self._prompt_cache[p] for p in prompts])

    def initial_latents(self, generators: list[torch.Generator]) -> torch.Tensor:
        """``x_T ~ N(0, I)``, one generator per sample, ``[B, C, h, w]`` float32."""
        shape = (len(generators), *self.latent_shape)
        return randn_tensor(shape, generator=generators, device=self.device, dtype=torch.float32)

    def predict(
        self, latents: torch.Tensor, timesteps: torch.Tensor, prompt_embeds: torch.Tensor, guidance_scale: float
    ) -> torch.Tensor:
        """The model output at ``latents`` after classifier-free guidance, float32 ``[B, C, h, w]``.

        ``timesteps`` is a scalar or ``[B]``; unconditional and conditional halves run as one batch.
        """
        batch = latents.shape[0]
        timesteps = torch.as_tensor(timesteps, device=self.device).expand(batch)
        if guidance_scale == 1.0:
            return self.denoiser(latents.to(self.dtype), timesteps, prompt_embeds).sample.float()
        negative = self.negative_embeds.expand(batch, -1, -1)
        model_in = torch.cat([latents, latents]).to(self.dtype)
        out = self.denoiser(model_in, torch.cat([timesteps, timesteps]), torch.cat([negative, prompt_embeds])).sample
        uncond, cond = out.float().chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    def step(
        self,
        model_output: torch.Tensor,
        num_steps: int,
        step_index: int | torch.Tensor,
        latents: torch.Tensor,
        *,
        eta: float,
        noise_schedule: str = "gddim",
        generator: list[torch.Generator] | torch.Generator | None = None,
        prev_sample: torch.Tensor | None = None,
        log_prob_reduction: str = "mean",
    ) -> StepOutput:
        """One reverse step at ``step_index`` (scalar or ``[B]``) of the ``num_steps`` schedule."""
        schedule = self.schedule(num_steps)
        index = torch.as_tensor(step_index).cpu()  # host indices (the trainers keep them there): no device sync
        return gddim_step(
            model_output,
            schedule.timesteps[index],
            latents,
            alphas_cumprod=self.alphas_cumprod,
            prev_timestep=schedule.prev_timesteps[index],
            final_alpha_cumprod=self.final_alpha_cumprod,
            eta=eta,
            prediction_type=self.prediction_type,
            noise_schedule=noise_schedule,
            generator=generator,
            prev_sample=prev_sample,
            log_prob_reduction=log_prob_reduction,
        )

    def _alpha(self, num_steps: int, step_index: int | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``a_t`` of step ``step_index`` (scalar or ``[B]``), broadcastable against ``like``, float32."""
        timesteps = self.schedule(num_steps).timesteps[torch.as_tensor(step_index).cpu()]
        return per_sample(self.alphas_cumprod[timesteps].float(), like)

    def noised(
        self, x0: torch.Tensor, num_steps: int, step_index: int | torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """The forward process's sample at step ``step_index``'s timestep (scalar or ``[B]``):
        ``sqrt(a_t) x0 + sqrt(1 - a_t) noise``."""
        alpha = self._alpha(num_steps, step_index, x0).to(x0.dtype)
        return alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise

    def predicted_clean(
        self, model_output: torch.Tensor, num_steps: int, step_index: int | torch.Tensor, latents: torch.Tensor
    ) -> torch.Tensor:
        """The clean sample ``model_output`` (of the scheduler's prediction type) at ``latents`` predicts, float32."""
        return to_x0_eps(model_output, latents, self._alpha(num_steps, step_index, latents), self.prediction_type)[0]

    def timestep_input(self, num_steps: int, step_index: int | torch.Tensor) -> torch.Tensor:
        """The model's timestep input for ``step_index`` (scalar or ``[B]``)."""
        schedule = self.schedule(num_steps)
        return schedule.model_timesteps[torch.as_tensor(step_index, device=schedule.model_timesteps.device)]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``[B, C, h, w]`` -> images ``[B, 3, H, W]`` float32 in [0, 1], differentiable (samplers call it
        under no_grad)."""
        scaled = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
        return (self.vae.decode(scaled).sample.float() / 2 + 0.5).clamp(0, 1)
