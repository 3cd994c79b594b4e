"""A module-level reward for the ``package.module:function`` resolution tests."""

import torch


def constant_reward(images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
    return torch.full((images.shape[0],), 0.5)


def brightness(images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
    """Mean pixel value: a reward that varies on a random-weight model's images (the shapes verifier scores them all
    alike), for runs that must learn something."""
    return images.mean(dim=(1, 2, 3))
