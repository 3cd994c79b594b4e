"""Policies: one file per model family; :func:`load` picks the family so trainers never import one."""

from __future__ import annotations

import torch

from diffrl.config import Config


def load(config: Config, device: torch.device | str = "cpu"):
    """The policy for ``config.model`` with LoRA from ``config.lora`` (unless ``model.full_finetune``)."""
    if config.model.family == "sd":
        from diffrl.policies.sd import SDPolicy

        return SDPolicy.load(config.model, config.lora, device)
    if config.model.family == "flux":
        from diffrl.policies.flux import FluxPolicy

        return FluxPolicy.load(config.model, config.lora, device)
    raise ValueError(f"unknown model family {config.model.family!r}; use 'sd' or 'flux'.")
