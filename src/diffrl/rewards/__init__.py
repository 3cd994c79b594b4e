"""Rewards: plain callables ``(images [B, 3, H, W] in [0, 1], prompts, metadata) -> Tensor[B]``.

Resolve one with :func:`build_reward` (registry name, ``module:function`` or ``file.py:function``) and several as a
weighted mix with :func:`weighted_sum`. Importing this package imports no reward's heavy dependencies.
"""

from diffrl.rewards.combine import Reward, RewardError, RewardOutput, WeightedSum, check_scores
from diffrl.rewards.registry import REGISTRY, build_reward, parse_reward_spec, weighted_sum

__all__ = [
    "REGISTRY",
    "Reward",
    "RewardError",
    "RewardOutput",
    "WeightedSum",
    "build_reward",
    "check_scores",
    "parse_reward_spec",
    "weighted_sum",
]
