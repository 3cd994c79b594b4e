"""The Stable Diffusion 3 / 3.5 policy (rectified flow, ``SD3Transformer2DModel``, an MMDiT) with LoRA via peft.

The same surface as the SD and FLUX policies, so the rollout, the trainers and evaluation run unchanged. Latents
are ``[B, 16, h, w]`` as ``StableDiffusion3Pipeline`` keeps them (the transformer patches them itself). The
prompt encoding is the pipeline's own: CLIP-L and CLIP-G hidden states side by side, padded to T5's width and
followed by T5's tokens (zeros when the model is loaded without T5, as diffusers allows), and the two CLIP pooled
embeddings. The schedule is the pipeline's: ``FlowMatchEulerDiscreteScheduler``'s shifted sigmas (shift 3 for
SD3.5), ending at 0; classifier-free guidance is the pipeline's, against the encoded empty prompt. Steps are the
gDDIM-flow or Flow-GRPO steps FLUX uses.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.utils.torch_utils import randn_tensor

from diffrl.config import LoraConfig, ModelConfig
from diffrl.policies.common import LoraModel, pipeline_dtype, resolve_model_path
from diffrl.policies.flow_steps import FlowSchedule, FlowSteps


class SD3Policy(FlowSteps, LoraModel):
    family = "sd3"
    pipeline_class = StableDiffusion3Pipeline
    component = "transformer"

    def __init__(
        self,
        pipeline: StableDiffusion3Pipeline,
        lora: LoraConfig | None,
        device: torch.device | str,
        resolution: int = 0,
        max_sequence_length: int = 0,
    ):
        self.device = torch.device(device)
        encoders = (pipeline.vae, pipeline.text_encoder, pipeline.text_encoder_2, pipeline.text_encoder_3)
        for encoder in (e for e in encoders if e is not None):
            encoder.to(self.device).requires_grad_(False).eval()
        self.pipeline = pipeline  # its encode_prompt is used as it is
        self.vae = pipeline.vae
        self.transformer = pipeline.transformer.to(self.device)
        self.denoiser = self.transformer  # what forward passes call; a trainer may swap in a DDP-wrapped model
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipeline.scheduler.config)
        tokenizer_3 = pipeline.tokenizer_3
        default_length = min(tokenizer_3.model_max_length, 256) if tokenizer_3 is not None else 256
        self.max_sequence_length = max_sequence_length or default_length  # the pipeline's default: 256
        self._setup_training(self.transformer, lora)
        self.vae_scale_factor = pipeline.vae_scale_factor
        default = self.transformer.config.sample_size * self.vae_scale_factor  # SD3.5: 128 x 8 = 1024
        self.resolution = resolution or default
        self.latent_shape = (self.transformer.config.in_channels, *(2 * [self.resolution // self.vae_scale_factor]))
        self._prompt_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._schedules: dict[int, FlowSchedule] = {}

    @classmethod
    def load(cls, model: ModelConfig, lora: LoraConfig, device: torch.device | str = "cpu") -> SD3Policy:
        """Load an SD3/SD3.5-layout model from a local directory or a hub id (without T5 when ``model.t5`` is
        false) and add LoRA (unless full fine-tune)."""
        path = resolve_model_path(model.path, "sd3")
        extra = {} if model.t5 else {"text_encoder_3": None, "tokenizer_3": None}
        pipeline = StableDiffusion3Pipeline.from_pretrained(
            path, revision=model.revision, **pipeline_dtype(model.dtype), **extra
        )
        policy = cls(
            pipeline, None if model.full_finetune else lora, device, model.resolution, model.max_sequence_length
        )
        policy._apply_options(model)
        return policy

    def pipeline_kwargs(self, num_steps: int, guidance_scale: float) -> dict:
        """Keyword arguments of a plain ``StableDiffusion3Pipeline`` call that draws this policy's ODE samples (with
        the adapter loaded with ``load_lora_weights`` and one ``torch.Generator().manual_seed(seed)`` per prompt)."""
        return {
            "num_inference_steps": num_steps,
            "guidance_scale": guidance_scale,
            "height": self.resolution,
            "width": self.resolution,
            "max_sequence_length": self.max_sequence_length,
        }

    # ------------------------------------------------------------------------------------------------------------
    # sampling surface

    def schedule(self, num_steps: int) -> FlowSchedule:
        if num_steps not in self._schedules:
            config, kwargs = self.scheduler.config, {}
            if config.get("use_dynamic_shifting", False):  # as the pipeline: mu from the image's token count
                side = self.latent_shape[-1] // self.transformer.config.patch_size
                kwargs["mu"] = calculate_shift(
                    side * side,
                    config.get("base_image_seq_len", 256),
                    config.get("max_image_seq_len", 4096),
                    config.get("base_shift", 0.5),
                    config.get("max_shift", 1.16),
                )
            self.scheduler.set_timesteps(num_steps, device=self.device, **kwargs)
            self._schedules[num_steps] = FlowSchedule(
                self.scheduler.sigmas.to("cpu", torch.float32), self.scheduler.timesteps.to(self.device)
            )
        return self._schedules[num_steps]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(joint CLIP and T5 hidden states ``[B, 77 + L, D]``, pooled CLIP embeddings ``[B, P]``), cached per
        prompt."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if missing:
            embeds, _, pooled, _ = self.pipeline.encode_prompt(
                prompt=missing,
                prompt_2=None,
                prompt_3=None,
                device=self.device,
                do_classifier_free_guidance=False,
                max_sequence_length=self.max_sequence_length,
            )
            pairs = zip(embeds.to(self.dtype), pooled.to(self.dtype), strict=True)
            self._prompt_cache.update(zip(missing, pairs, strict=True))
        embeds, pooled = zip(*(self._prompt_cache[p] for p in prompts), strict=True)
        return torch.stack(embeds), torch.stack(pooled)

    def initial_latents(self, generators: list[torch.Generator]) -> torch.Tensor:
        """``x_1 ~ N(0, I)`` ``[B, 16, h, w]``, one generator per sample, drawn as the pipeline's
        ``prepare_latents`` does."""
        shape = (len(generators), *self.latent_shape)
        return randn_tensor(shape, generator=generators, device=self.device, dtype=torch.float32)

    def predict(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: tuple[torch.Tensor, torch.Tensor],
        guidance_scale: float,
    ) -> torch.Tensor:
        """The predicted velocity at ``latents`` after guidance, float32 ``[B, C, h, w]``; the unconditional and
        conditional halves run as one batch, as in the pipeline."""
        t = torch.as_tensor(timesteps, device=self.device).expand(latents.shape[0]).to(self.dtype)
        return self.guided(self._forward, latents, t, prompt_embeds, guidance_scale)

    def _forward(self, latents, t, embeds, pooled) -> torch.Tensor:
        return self.denoiser(
            hidden_states=latents,
            timestep=t,
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            return_dict=False,
        )[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``[B, 16, h, w]`` -> images ``[B, 3, H, W]`` float32 in [0, 1], differentiable (samplers call
        it under no_grad)."""
        scaled = latents / self.vae.config.scaling_factor + self.vae.config.shift_factor
        return (self.vae.decode(scaled.to(self.vae.dtype)).sample.float() / 2 + 0.5).clamp(0, 1)
