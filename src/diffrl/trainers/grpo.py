"""GRPO-style training: K images per prompt, advantages relative to the prompt's group, PPO clipping, optional
KL to the reference (LoRA-disabled) policy, and optional ODE/SDE windows (only steps inside are stochastic and
trained, as in MixGRPO).

Groups are never split: a process samples whole groups (``sample.batch_size`` is a multiple of K), so its group
statistics are exact without communication; logged statistics are gathered across processes.
"""

from __future__ import annotations

import random

import torch

from diffrl.trainers.base import GatheredRewards, Samples, Trainer, derived_seed
from diffrl.trainers.common import clip_advantages, group_advantages

PROMPTS, NOISE, STEP_NOISE = 101, 102, 104  # purposes mixed into derived seeds (103 is NFT's)


class GRPOTrainer(Trainer):
    def epoch_sampler(self, epoch: int):
        """``batch -> (prompts, seeds, step_seeds, mirror)`` for this process; the epoch's groups are fixed globally.

        Every image has its own initial and step noise, unless ``train.same_noise_in_group`` (a group shares its
        initial noise) or ``train.antithetic_noise`` (consecutive images pair up: the pair shares its initial noise
        and its step seed, and the second takes the opposite step noise)."""
        cfg, k = self.config, self.config.train.group_size
        num_groups = self.world * cfg.sample.num_batches_per_epoch * cfg.sample.batch_size // k
        rng = random.Random(derived_seed(cfg.train.seed, epoch, PROMPTS))
        group_prompts = rng.choices(self.train_prompts, k=num_groups)

        def initial(g: int) -> int:
            if cfg.train.same_noise_in_group:
                return derived_seed(cfg.train.seed, epoch, NOISE, -1 - g // k)
            return derived_seed(cfg.train.seed, epoch, NOISE, g - g % 2 if cfg.train.antithetic_noise else g)

        def batch(b: int) -> tuple[list[str], list[int], list[int] | None, list[bool] | None]:
            indices = [self.global_index(b, i) for i in range(cfg.sample.batch_size)]
            prompts = [group_prompts[g // k] for g in indices]
            own = [derived_seed(cfg.train.seed, epoch, NOISE, g) for g in indices]
            if cfg.train.antithetic_noise:
                pair_steps = [derived_seed(cfg.train.seed, epoch, STEP_NOISE, g - g % 2) for g in indices]
                return prompts, [initial(g) for g in indices], pair_steps, [g % 2 == 1 for g in indices]
            if not cfg.train.same_noise_in_group:
                return prompts, own, None, None
            return prompts, [initial(g) for g in indices], own, None  # same initial noise, distinct step noise

        return batch

    def advantages(self, samples: Samples, gathered: GatheredRewards) -> torch.Tensor:
        """Each sample's reward relative to its group (groups are never split across processes), scaled as
        ``train.advantage_scale`` says (``"batch"``: by the std of every process's rewards), then clipped."""
        cfg = self.config.train
        batch_std = None
        if cfg.advantage_scale == "batch":
            kept = gathered.rewards[gathered.valid]
            batch_std = kept.std(unbiased=False).item() if len(kept) else 1.0  # nothing kept: every advantage is 0
        advantages = group_advantages(
            samples.rewards, cfg.group_size, samples.valid, scale=cfg.advantage_scale, batch_std=batch_std
        )
        return clip_advantages(advantages, cfg.adv_clip_max)

    def train(self) -> None:
        cfg = self.config
        self.evaluate_base_policy()
        for epoch in self.epochs():
            timer = self.epoch_timer()
            final = epoch == cfg.train.epochs - 1

            # SAMPLING: K trajectories per prompt, scored by the reward
            samples = self.sample_epoch(epoch, self.epoch_sampler(epoch))
            sampling_seconds = timer.lap()

            # ADVANTAGES: relative to the group of the same prompt
            gathered = self.gather_rewards(samples)
            advantages = self.advantages(samples, gathered)

            # TRAINING: inner epochs of clipped updates
            metrics = self.train_epoch(epoch, samples, advantages)
            metrics["time/sampling_s"] = sampling_seconds
            metrics["time/training_s"] = timer.lap()

            # LOG, EVALUATE, CHECKPOINT
            metrics.update(self.reward_metrics(gathered))
            self.end_epoch(epoch + 1, metrics, final)
        self.finish()

    def reward_metrics(self, gathered) -> dict[str, float]:
        metrics = super().reward_metrics(gathered)
        rewards, valid = gathered.rewards, gathered.valid
        groups = torch.where(valid, rewards, torch.zeros_like(rewards)).view(-1, self.config.train.group_size)
        metrics["reward/zero_std_groups"] = (groups.std(dim=1) == 0).float().mean().item()
        return metrics
