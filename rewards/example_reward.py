"""An example custom reward: prefer bright images. Use it with

    diffrl train recipes/grpo_tiny.py --reward rewards/example_reward.py:brightness

or from Python: ``GRPOTrainer(config, reward=brightness)``.
"""

import torch


def brightness(images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
    """Mean pixel value of each image: ``images`` [B, 3, H, W] in [0, 1] -> [B]."""
    return images.mean(dim=(1, 2, 3))
