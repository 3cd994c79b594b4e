"""A module-level reward for the ``package.module:function`` resolution tests."""

import torch


def constant_reward(images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
    return torch.full((images.shape[0],), 0.5)
