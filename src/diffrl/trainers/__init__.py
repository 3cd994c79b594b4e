"""Trainers: DDPO (``ddpo_sf``, ``ddpo_is``) and GRPO (policy gradient), DiffusionNFT (``nft``), DRaFT-K
(``draft``)."""

from __future__ import annotations

from diffrl.config import Config
from diffrl.rewards import Reward
from diffrl.trainers.ddpo import DDPOTrainer
from diffrl.trainers.draft import DRaFTTrainer
from diffrl.trainers.grpo import GRPOTrainer
from diffrl.trainers.nft import NFTTrainer


def make_trainer(config: Config, reward: Reward | dict | str | None = None, resume: str | None = None):
    """The trainer for ``config.train.algorithm``; ``reward`` (a callable, a weighted dict or a spec) overrides
    ``config.reward``."""
    if config.train.algorithm == "grpo":
        return GRPOTrainer(config, reward=reward, resume=resume)
    if config.train.algorithm == "nft":
        return NFTTrainer(config, reward=reward, resume=resume)
    if config.train.algorithm == "draft":
        return DRaFTTrainer(config, reward=reward, resume=resume)
    return DDPOTrainer(config, reward=reward, resume=resume)


def train(config: Config, reward: Reward | dict | str | None = None, resume: str | None = None) -> None:
    make_trainer(config, reward=reward, resume=resume).train()


__all__ = ["DDPOTrainer", "DRaFTTrainer", "GRPOTrainer", "NFTTrainer", "make_trainer", "train"]
