"""The Stable Diffusion policy (SD1.x/2.x layout, epsilon or v prediction) with LoRA via peft.

A small duck-typed surface that the rollout, the trainers and evaluation use without knowing the model family:
``schedule``, ``encode_prompts``, ``initial_latents``, ``predict``, ``step``, ``decode``, ``trainable_parameters``,
``reference`` (the policy with LoRA disabled), ``save_adapter`` / ``load_adapter``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from diffusers.utils.torch_utils import randn_tensor
from peft import LoraConfig as PeftLoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from diffrl.config import LoraConfig, ModelConfig
from diffrl.sampling.common import StepOutput
from diffrl.sampling.gddim import gddim_step

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(path: str) -> str:
    """``"tiny"`` is the embedded model; a local directory must exist; anything else is taken as a hub id."""
    if path == "tiny":
        from diffrl.tiny import tiny_sd_path

        return str(tiny_sd_path())
    local = Path(path).expanduser()
    looks_local = path.startswith((".", "/", "~")) or local.exists() or path.count("/") != 1
    if looks_local and not local.is_dir():
        raise FileNotFoundError(
            f"model directory {path!r} does not exist; give a diffusers-layout directory, a hub id "
            "('org/name'), or 'tiny' for the embedded model."
        )
    if local.is_dir() and not (local / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{path!r} is not a diffusers pipeline directory (no model_index.json); save the model with "
            "`pipeline.save_pretrained(dir)` or point model.path at the folder that holds model_index.json."
        )
    return str(local) if local.is_dir() else path


@dataclass(frozen=True)
class SDSchedule:
    """The DDIM timesteps of ``num_steps`` steps, as diffusers' pipeline walks them: ``[T]`` each."""

    timesteps: torch.Tensor
    prev_timesteps: torch.Tensor

    def __len__(self) -> int:
        return len(self.timesteps)


class SDPolicy:
    family = "sd"

    def __init__(self, pipeline: StableDiffusionPipeline, lora: LoraConfig | None, device: torch.device):
        self.device = torch.device(device)
        self.vae = pipeline.vae.to(self.device).requires_grad_(False).eval()
        self.text_encoder = pipeline.text_encoder.to(self.device).requires_grad_(False).eval()
        self.tokenizer = pipeline.tokenizer
        self.unet = pipeline.unet.to(self.device)
        self.denoiser = self.unet  # what forward passes call; a trainer may swap in a DDP-wrapped unet
        self.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
        self.prediction_type = self.scheduler.config.prediction_type
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(self.device)
        self.final_alpha_cumprod = float(self.scheduler.final_alpha_cumprod)
        self.lora = lora
        if lora is None:
            self.unet.requires_grad_(True)
        else:
            self.unet.requires_grad_(False)
            self.unet.add_adapter(
                PeftLoraConfig(
                    r=lora.rank,
                    lora_alpha=lora.alpha,
                    lora_dropout=lora.dropout,
                    init_lora_weights="gaussian",
                    target_modules=list(lora.target_modules),
                )
            )
            cast_training_params(self.unet, dtype=torch.float32)
        self._prompt_cache: dict[str, torch.Tensor] = {}
        self._schedules: dict[int, SDSchedule] = {}
        latent_size = self.unet.config.sample_size
        self.latent_shape = (self.unet.config.in_channels, latent_size, latent_size)

    @classmethod
    def load(cls, model: ModelConfig, lora: LoraConfig, device: torch.device | str = "cpu") -> SDPolicy:
        """Load an SD1.x/2.x-layout model from a local directory or a hub id and add LoRA (unless full fine-tune)."""
        path = resolve_model_path(model.path)
        pipeline = StableDiffusionPipeline.from_pretrained(
            path,
            revision=model.revision,
            torch_dtype=DTYPES[model.dtype],
            safety_checker=None,
            requires_safety_checker=False,
        )
        policy = cls(pipeline, None if model.full_finetune else lora, device)
        if model.gradient_checkpointing:
            policy.unet.enable_gradient_checkpointing()
        return policy

    # ------------------------------------------------------------------------------------------------------------
    # sampling surface

    def schedule(self, num_steps: int) -> SDSchedule:
        if num_steps not in self._schedules:
            self.scheduler.set_timesteps(num_steps, device=self.device)
            timesteps = self.scheduler.timesteps.clone()
            # diffusers' DDIMScheduler.step: previous timestep = t - num_train_timesteps // num_steps
            prev = timesteps - self.scheduler.config.num_train_timesteps // num_steps
            self._schedules[num_steps] = SDSchedule(timesteps, prev)
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
            embeds = self.text_encoder(ids)[0].to(self.unet.dtype)
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
            return self.denoiser(latents.to(self.unet.dtype), timesteps, prompt_embeds).sample.float()
        negative = self.encode_prompts([""]).expand(batch, -1, -1)
        model_in = torch.cat([latents, latents]).to(self.unet.dtype)
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
        index = torch.as_tensor(step_index, device=self.device)
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

    def timestep_input(self, num_steps: int, step_index: int | torch.Tensor) -> torch.Tensor:
        """The model's timestep input for ``step_index`` (scalar or ``[B]``)."""
        return self.schedule(num_steps).timesteps[torch.as_tensor(step_index, device=self.device)]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``[B, C, h, w]`` -> images ``[B, 3, H, W]`` float32 in [0, 1]."""
        scaled = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
        return (self.vae.decode(scaled).sample.float() / 2 + 0.5).clamp(0, 1)

    # ------------------------------------------------------------------------------------------------------------
    # training surface

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Run the base model: LoRA disabled inside the block (a full fine-tune has no reference)."""
        if self.lora is None:
            raise ValueError("a full fine-tune keeps no reference model; set train.kl_coef=0 or train LoRA.")
        self.unet.disable_adapters()
        try:
            yield
        finally:
            self.unet.enable_adapters()

    def save_adapter(self, directory: str | Path) -> None:
        """LoRA weights in diffusers' format (``pytorch_lora_weights.safetensors`` with the adapter config), loadable
        with plain ``StableDiffusionPipeline.load_lora_weights``; a full fine-tune saves the UNet."""
        directory = Path(directory)
        if self.lora is None:
            self.unet.save_pretrained(directory / "unet")
            return
        state = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.unet))
        StableDiffusionPipeline.save_lora_weights(
            save_directory=directory,
            unet_lora_layers=state,
            safe_serialization=True,
            unet_lora_adapter_metadata=self.unet.peft_config["default"].to_dict(),
        )

    def load_adapter(self, directory: str | Path) -> None:
        """Load weights written by :meth:`save_adapter` into this policy's LoRA (or UNet)."""
        directory = Path(directory)
        if self.lora is None:
            from diffusers import UNet2DConditionModel

            loaded = UNet2DConditionModel.from_pretrained(directory / "unet")
            self.unet.load_state_dict(loaded.state_dict())
            return
        state, _ = StableDiffusionPipeline.lora_state_dict(directory)
        unet_state = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
        result = set_peft_model_state_dict(self.unet, convert_unet_state_dict_to_peft(unet_state), "default")
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise ValueError(f"LoRA weights in {str(directory)!r} do not fit this model: {unexpected[:5]} ...")
