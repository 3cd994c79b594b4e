"""DDPO (Black et al. 2023): score-function (``ddpo_sf``) or importance-sampled with PPO clipping (``ddpo_is``),
with per-prompt reward normalisation over a buffer that persists across epochs.

Under ``accelerate launch`` every process samples its share of the epoch's prompts; rewards are gathered so the
per-prompt statistics see the whole batch, and each process trains on its own samples.
"""

from __future__ import annotations

import random

import torch

from diffrl.trainers.base import Trainer, derived_seed
from diffrl.trainers.common import PerPromptStatTracker, clip_advantages

PROMPTS, NOISE = 201, 202  # purposes mixed into derived seeds


class DDPOTrainer(Trainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        train = self.config.train
        self.stat_tracker = PerPromptStatTracker(train.stat_buffer_size, train.stat_min_count)
        if "stat_tracker" in self.extra_state:
            self.stat_tracker.load_state_dict(self.extra_state["stat_tracker"])

    def epoch_prompts(self, epoch: int) -> list[str]:
        """The epoch's global prompt list (every process computes the same one)."""
        cfg = self.config
        total = self.world * cfg.sample.num_batches_per_epoch * cfg.sample.batch_size
        return random.Random(derived_seed(cfg.train.seed, epoch, PROMPTS)).choices(self.train_prompts, k=total)

    def epoch_sampler(self, epoch: int):
        prompts = self.epoch_prompts(epoch)
        seed = self.config.train.seed

        def batch(b: int) -> tuple[list[str], list[int], None, None]:
            indices = [self.global_index(b, i) for i in range(self.config.sample.batch_size)]
            return [prompts[g] for g in indices], [derived_seed(seed, epoch, NOISE, g) for g in indices], None, None

        return batch

    def gathered_prompts(self, epoch: int) -> list[str]:
        """Prompts in the order ``accelerator.gather`` returns this epoch's per-process samples (process-major)."""
        prompts, cfg = self.epoch_prompts(epoch), self.config.sample
        return [
            prompts[(b * self.world + rank) * cfg.batch_size + i]
            for rank in range(self.world)
            for b in range(cfg.num_batches_per_epoch)
            for i in range(cfg.batch_size)
        ]

    def train(self) -> None:
        cfg = self.config
        self.evaluate_base_policy()
        for epoch in self.epochs():
            timer = self.epoch_timer()
            final = epoch == cfg.train.epochs - 1

            # SAMPLING
            samples = self.sample_epoch(epoch, self.epoch_sampler(epoch))
            sampling_seconds = timer.lap()

            # ADVANTAGES: per-prompt normalisation over the gathered batch and the buffer of earlier epochs
            gathered = self.gather_rewards(samples)
            rewards, valid = gathered.rewards, gathered.valid
            prompts = [p for p, ok in zip(self.gathered_prompts(epoch), valid.tolist(), strict=True) if ok]
            advantages = torch.zeros_like(rewards)
            advantages[valid] = self.stat_tracker.update(prompts, rewards[valid])
            local = len(samples)
            advantages = clip_advantages(
                advantages[self.rank * local : (self.rank + 1) * local], cfg.train.adv_clip_max
            )

            # TRAINING
            metrics = self.train_epoch(epoch, samples, advantages)
            metrics["time/sampling_s"] = sampling_seconds
            metrics["time/training_s"] = timer.lap()

            # LOG, EVALUATE, CHECKPOINT
            metrics.update(self.reward_metrics(gathered))
            self.extra_state["stat_tracker"] = self.stat_tracker.state_dict()
            self.end_epoch(epoch + 1, metrics, final)
        self.finish()
