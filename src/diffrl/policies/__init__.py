"""Policies: one file per model family; :func:`load` picks the family so trainers never import one."""

from __future__ import annotations

import torch

from diffrl.config import Config
from diffrl.quiet import library_progress_bars


def load(config: Config, device: torch.device | str = "cpu"):
    """The policy for ``config.model`` with LoRA from ``config.lora`` (unless ``model.full_finetune``); the
    libraries' loading bars follow ``logging.progress_bars``."""
    library_progress_bars(config.logging.progress_bars)
    if config.model.family == "sd":
        from diffrl.policies.sd import SDPolicy

        return SDPolicy.load(config.model, config.lora, device)
    if config.model.family == "sdxl":
        from diffrl.policies.sdxl import SDXLPolicy

        return SDXLPolicy.load(config.model, config.lora, device)
    if config.model.family == "sd3":
        from diffrl.policies.sd3 import SD3Policy

        return SD3Policy.load(config.model, config.lora, device)
    if config.model.family == "flux":
        from diffrl.policies.flux import FluxPolicy

        return FluxPolicy.load(config.model, config.lora, device)
    raise ValueError(f"unknown model family {config.model.family!r}; use 'sd', 'sdxl', 'sd3' or 'flux'.")


def pipeline_kwargs(policy, config: Config, num_steps: int | None = None) -> dict:
    """The plain diffusers pipeline call that reproduces a run's ODE samples (``eval.num_steps`` unless given, the
    run's guidance): ``pipeline(prompts, generator=[torch.Generator().manual_seed(s) for s in seeds],
    **pipeline_kwargs(policy, config))``. SD pipelines need the DDIM scheduler first (see ``SDPolicy``)."""
    return policy.pipeline_kwargs(num_steps or config.eval.num_steps, config.sample.guidance_scale)
