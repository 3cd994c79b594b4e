"""Sampling an epoch: rollouts of the current policy, their rewards (scored while the next batch samples,
with ``reward.overlap``), the checks on their log-probabilities and the rewards gathered over processes.
"""

from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from diffrl.rewards.remote import RemoteReward
from diffrl.sampling.rollout import Trajectory, moving_window, rollout


@dataclass
class Samples:
    """One epoch's trajectories on this process, flattened, with their rewards."""

    trajectory: Trajectory
    rewards: torch.Tensor  # [N] weighted total (NaN where dropped)
    parts: dict[str, torch.Tensor]  # [N] per reward
    valid: torch.Tensor  # [N] bool
    nonfinite_log_probs: int = 0  # samples dropped for a NaN/inf log-probability (train.on_nonfinite='skip')

    def __len__(self) -> int:
        return len(self.trajectory.prompts)


@dataclass
class GatheredRewards:
    """An epoch's rewards from every process, in the order ``accelerator.gather`` returns them (process-major)."""

    rewards: torch.Tensor  # [N_global] weighted total (NaN where dropped)
    valid: torch.Tensor  # [N_global] bool
    parts: dict[str, torch.Tensor]  # [N_global] per reward


def concat_trajectories(parts: list[Trajectory]) -> Trajectory:
    first = parts[0]
    embeds = [t.prompt_embeds for t in parts]
    if isinstance(first.prompt_embeds, tuple):
        merged = tuple(torch.cat(column) for column in zip(*embeds, strict=True))
    else:
        merged = torch.cat(embeds)
    return Trajectory(
        latents=torch.cat([t.latents for t in parts]),
        log_probs=torch.cat([t.log_probs for t in parts]),
        timesteps=first.timesteps,
        sde_mask=first.sde_mask,
        prompt_embeds=merged,
        prompts=[p for t in parts for p in t.prompts],
        seeds=[s for t in parts for s in t.seeds],
        images=torch.cat([t.images for t in parts]),
        eta=first.eta,
        num_steps=first.num_steps,
        guidance_scale=first.guidance_scale,
        noise_schedule=first.noise_schedule,
    )


class SamplingPhase:
    """The sampling phase of :class:`~diffrl.trainers.base.Trainer`."""

    def global_index(self, batch: int, i: int) -> int:
        """Index of local sample ``i`` of sampling batch ``batch`` in the epoch's global list (rank-major per batch),
        so that a run on P processes samples exactly what one process with P-times the batch samples."""
        return (batch * self.world + self.rank) * self.config.sample.batch_size + i

    def sample_epoch(self, epoch: int, prompts_and_seeds) -> Samples:
        """Roll out and score this process's share of the epoch. ``prompts_and_seeds(batch) -> (prompts, seeds,
        step_seeds, mirror)`` gives a sampling batch's prompts, seeds and mirrored rows (:func:`rollout`). With
        ``reward.overlap`` a batch is scored in a worker thread while the next one is sampled (scores are the same
        either way)."""
        cfg = self.config.sample
        self.policy.denoiser.eval()
        overlap = self.overlap_scoring()
        trajectories, scored = [], []
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward") as pool:
            for batch in range(cfg.num_batches_per_epoch):
                prompts, seeds, step_seeds, mirror = prompts_and_seeds(batch)
                trajectory = rollout(
                    self.policy,
                    prompts,
                    seeds,
                    eta=cfg.eta,
                    num_steps=cfg.num_steps,
                    guidance_scale=cfg.guidance_scale,
                    noise_schedule=cfg.noise_schedule,
                    sde_window=moving_window(
                        cfg.sde_window, cfg.num_steps, cfg.window_stride, cfg.window_shift_every, epoch
                    ),
                    log_prob_reduction=cfg.log_prob_reduction,
                    step_seeds=step_seeds,
                    mirror=mirror,
                    progress=self.config.logging.progress_bars and self.is_main,
                )
                trajectories.append(trajectory)
                metadata = [{"epoch": epoch} for _ in prompts]
                if overlap:
                    scored.append(pool.submit(self.reward.score, trajectory.images, prompts, metadata, batch))
                else:
                    scored.append(self.reward.score(trajectory.images, prompts, metadata, batch))
            outputs = [out.result() if isinstance(out, Future) else out for out in scored]
        samples = Samples(
            trajectory=concat_trajectories(trajectories),
            rewards=torch.cat([out.total for out in outputs]),
            parts={name: torch.cat([out.parts[name] for out in outputs]) for name in outputs[0].parts},
            valid=torch.cat([out.valid for out in outputs]),
        )
        self._check_log_probs(samples, epoch)
        return samples

    def overlap_scoring(self) -> bool:
        """Whether rewards are scored in a worker thread while sampling goes on (``reward.overlap``). 'auto' overlaps
        when sampling runs on an accelerator or a reward is a server; on a CPU an in-process reward competes with
        the sampler for the same cores and slows it (docs/performance.md), so it scores inline there."""
        overlap = self.config.reward.overlap
        if overlap != "auto":
            return bool(overlap)
        remote = any(isinstance(fn, RemoteReward) for fn, _ in self.reward.rewards.values())
        return self.accelerator.device.type != "cpu" or remote

    def _check_log_probs(self, samples: Samples, epoch: int) -> None:
        """A NaN/inf log-probability of a stochastic step raises (naming the step), or drops the sample (skip)."""
        trajectory = samples.trajectory
        finite = torch.isfinite(trajectory.log_probs[:, trajectory.sde_mask]).all(dim=1).cpu()
        if bool(finite.all()):
            return
        if self.config.train.on_nonfinite == "raise":
            row = int((~finite).nonzero()[0])
            bad_steps = (~torch.isfinite(trajectory.log_probs[row])).nonzero().flatten().tolist()
            raise FloatingPointError(
                f"non-finite log-probability at epoch {epoch}, sampling step(s) {bad_steps} of the trajectory of "
                f"{trajectory.prompts[row]!r}; nothing was saved from this epoch. A sampler step with near-zero "
                "variance (very small eta with many steps, or a corrupt model output) causes this: raise sample.eta, "
                "check the model, or set train.on_nonfinite=skip to drop such samples and count them."
            )
        samples.valid &= finite
        samples.nonfinite_log_probs = int((~finite).sum())

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather(values.to(self.accelerator.device)).cpu()

    def gather_rewards(self, samples: Samples) -> GatheredRewards:
        """This epoch's rewards from every process (one gather per tensor, done once per epoch)."""
        parts = {name: self.gather(values) for name, values in samples.parts.items()}
        return GatheredRewards(self.gather(samples.rewards), self.gather(samples.valid), parts)

    def reward_metrics(self, gathered: GatheredRewards) -> dict[str, float]:
        """Reward statistics of the epoch's global batch."""
        valid = gathered.valid
        kept = gathered.rewards[valid]
        nothing = not bool(valid.any())  # every sample dropped (reward.on_invalid='drop'): no statistics
        metrics = {
            "reward/mean": math.nan if nothing else kept.mean().item(),
            "reward/std": math.nan if nothing else kept.std(unbiased=False).item(),
            "reward/dropped": int((~valid).sum()),
        }
        for name, values in gathered.parts.items():
            metrics[f"reward/{name}/mean"] = math.nan if nothing else values[valid].mean().item()
        return metrics
