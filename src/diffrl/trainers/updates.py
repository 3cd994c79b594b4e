"""The inner training pass: the per-step loss (score function or clipped importance sampling, KL to the
reference), micro-batches and gradient accumulation, the skip-or-stop rule for non-finite steps, and the
on-policy check of the first update.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from tqdm.auto import tqdm

from diffrl.sampling.rollout import select_embeds
from diffrl.trainers.common import (
    clipped_surrogate_loss,
    derived_seed,
    gaussian_kl,
    score_function_loss,
    subsample_timesteps,
)
from diffrl.trainers.sampling import Samples


class UpdatePhase:
    """The update phase of :class:`~diffrl.trainers.base.Trainer`."""

    def step_loss(self, samples: Samples, rows: torch.Tensor, steps: torch.Tensor, advantages: torch.Tensor):
        """The loss of trajectories ``rows`` at their step indices ``steps`` (``[b]`` each)."""
        cfg, trajectory = self.config, samples.trajectory
        x_t = trajectory.latents[rows, steps]
        x_prev = trajectory.latents[rows, steps + 1]
        embeds = select_embeds(trajectory.prompt_embeds, rows)
        with self.accelerator.autocast():
            model_output = self.policy.predict(x_t, trajectory.timesteps[steps], embeds, trajectory.guidance_scale)
        out = self.policy.step(
            model_output,
            trajectory.num_steps,
            steps,
            x_t,
            eta=trajectory.eta,
            noise_schedule=trajectory.noise_schedule,
            prev_sample=x_prev,
            log_prob_reduction=cfg.sample.log_prob_reduction,
        )
        if cfg.train.algorithm == "ddpo_sf":
            loss = score_function_loss(out.log_prob, advantages)
        else:
            old = trajectory.log_probs[rows, steps]
            loss = clipped_surrogate_loss(out.log_prob, old, advantages, cfg.train.clip_range)
        kl = torch.zeros((), device=out.mean.device)
        if cfg.train.kl_coef > 0:
            with torch.no_grad(), self.policy.reference(), self.accelerator.autocast():
                reference_output = self.policy.predict(
                    x_t, trajectory.timesteps[steps], embeds, trajectory.guidance_scale
                )
            reference = self.policy.step(
                reference_output, trajectory.num_steps, steps, x_t, eta=trajectory.eta,
                noise_schedule=trajectory.noise_schedule, prev_sample=x_prev,
            )  # fmt: skip
            kl = gaussian_kl(out.mean, reference.mean, out.std, cfg.sample.log_prob_reduction).mean()
            loss = dataclasses.replace(loss, loss=loss.loss + cfg.train.kl_coef * kl)
        return loss, kl, out.log_prob.detach()

    def train_epoch(self, epoch: int, samples: Samples, advantages: torch.Tensor) -> dict[str, float]:
        """Inner epochs of clipped updates on this process's samples; returns averaged diagnostics."""
        cfg = self.config.train
        advantages = advantages.to(self.accelerator.device)
        keep = samples.valid.nonzero().flatten()
        micro = cfg.batch_size
        usable = (len(keep) // (micro * cfg.gradient_accumulation_steps)) * micro * cfg.gradient_accumulation_steps
        generator = torch.Generator().manual_seed(derived_seed(cfg.seed, epoch, self.rank, 1))
        torch.manual_seed(derived_seed(cfg.seed, epoch, self.rank, 2))  # LoRA dropout
        self.policy.denoiser.train()
        stats: dict[str, list[float]] = {}
        lr = self.lr_scheduler.get_last_lr()[0]  # what this epoch's first update uses (the scheduler steps after)
        skipped = 0
        first_update_dev: float | None = None  # max |ratio - 1| over the first optimizer step's losses
        if cfg.check_on_policy:
            stats["on_policy_max_abs_ratio_minus_1"] = [self._check_on_policy(samples, keep, advantages, epoch)]
        bar = tqdm(
            total=cfg.num_inner_epochs * (usable // micro), desc="training", leave=False,
            disable=not (self.config.logging.progress_bars and self.is_main),
        )  # fmt: skip
        for _ in range(cfg.num_inner_epochs):
            # row and step indices stay on the host: the step maths reads the schedule there (no device sync)
            order = keep[torch.randperm(len(keep), generator=generator)][:usable]
            steps = subsample_timesteps(samples.trajectory.sde_mask, len(order), cfg.timestep_fraction, generator)
            num_micro = len(order) // micro
            window: list[tuple[dict[str, torch.Tensor], torch.Tensor]] = []  # this optimizer step's losses
            for m in range(num_micro):
                rows = order[m * micro : (m + 1) * micro]
                cols = steps[m * micro : (m + 1) * micro]
                bar.update(1)
                last_micro = (m + 1) % cfg.gradient_accumulation_steps == 0
                for k in range(cols.shape[1]):
                    sync = last_micro and k == cols.shape[1] - 1
                    context = contextlib.nullcontext() if sync else self.accelerator.no_sync(self.policy.denoiser)
                    with context:
                        loss, kl, _ = self.step_loss(samples, rows, cols[:, k], advantages[rows])
                        # a non-finite loss still runs backward so that every process joins the gradient
                        # all-reduce; it is found (and the step skipped or the run stopped) before the update
                        self.accelerator.backward(loss.loss / (cfg.gradient_accumulation_steps * cols.shape[1]))
                    values = {
                        "loss": loss.loss, "ratio": loss.ratio_mean, "clip_fraction": loss.clip_fraction,
                        "approx_kl": loss.approx_kl, "kl": kl, "ratio_max_abs_dev": loss.ratio_max_abs_dev,
                    }  # fmt: skip
                    window.append(({name: v.detach() for name, v in values.items()}, cols[:, k]))
                if last_micro:
                    grad_norm = self.accelerator.clip_grad_norm_(self.params, cfg.max_grad_norm)
                    # one device sync per optimizer step: the window's statistics and the gradient norm together
                    names = list(window[0][0])
                    table = torch.stack([torch.stack([v[n].float() for n in names]) for v, _ in window])
                    host = torch.cat([table.flatten(), torch.as_tensor(grad_norm).float().reshape(1)]).cpu()
                    table, grad_norm = host[:-1].reshape(table.shape), host[-1]
                    if first_update_dev is None:
                        first_update_dev = table[:, names.index("ratio_max_abs_dev")].max().item()
                    bad_window = self._window_not_finite(table[:, names.index("loss")], [c for _, c in window], epoch)
                    bad_window |= not self._finite(grad_norm, "gradient norm", epoch)
                    if self.world > 1:  # every process skips the same steps
                        flag = torch.tensor(float(bad_window), device=self.accelerator.device)
                        bad_window = bool(self.accelerator.reduce(flag, reduction="sum") > 0)
                    if bad_window:
                        skipped += 1
                    else:
                        self.optimizer.step()
                        self.lr_scheduler.step()
                        self.global_step += 1
                        for j, name in enumerate(names):
                            stats.setdefault(name, []).extend(table[:, j].tolist())
                        stats.setdefault("grad_norm", []).append(float(grad_norm))
                    self.optimizer.zero_grad(set_to_none=True)
                    window = []
        bar.close()
        largest = stats.pop("ratio_max_abs_dev", None)
        result = {f"train/{name}": sum(values) / len(values) for name, values in stats.items()}
        # 0 when every sample was dropped (reward.on_invalid='drop') or fewer remain than one optimizer step takes
        result["train/optimizer_steps"] = len(stats.get("grad_norm", []))
        if largest:
            result["train/ratio_max_abs_dev"] = max(largest)
        if cfg.on_nonfinite == "skip":
            result["train/skipped_steps"] = skipped
            result["sample/nonfinite_log_probs"] = samples.nonfinite_log_probs
        if first_update_dev is not None:
            result["train/ratio_first_update_max_abs_dev"] = first_update_dev
        result["train/lr"] = lr
        kept_advantages = advantages[keep.to(advantages.device)]
        result["train/advantage_abs_mean"] = kept_advantages.abs().mean().item() if len(keep) else 0.0
        stochastic = samples.trajectory.sde_mask.nonzero().flatten()
        if len(stochastic):
            result["sample/sde_window_start"] = int(stochastic[0])
            result["sample/sde_window_end"] = int(stochastic[-1]) + 1
        return result

    @torch.no_grad()
    def _check_on_policy(self, samples: Samples, keep: torch.Tensor, advantages: torch.Tensor, epoch: int) -> float:
        """Re-score every stochastic step of every kept sample with the sampling weights: max |ratio - 1|.

        Each step is re-scored on the layout it was sampled in (the sampling batch, every row at that step), so
        the network sees the same batch shapes and the ratio is exactly 1 on any machine whose kernels are
        deterministic for a given shape. The training pass re-scores other layouts (micro-batches, mixed steps),
        where a float32 network's output may differ in the last bits (``train/ratio_first_update_max_abs_dev``)."""
        mask = samples.trajectory.sde_mask.nonzero().flatten()
        kept = torch.zeros(len(samples), dtype=torch.bool)
        kept[keep] = True
        worst = 0.0
        size = self.config.sample.batch_size
        for start in range(0, len(samples), size):
            rows = torch.arange(start, min(start + size, len(samples)))
            for step in mask.tolist():
                cols = torch.full_like(rows, step)
                _, _, log_prob = self.step_loss(samples, rows, cols, advantages[rows])
                ratio = torch.exp(log_prob - samples.trajectory.log_probs[rows, cols])[kept[rows]]
                if len(ratio):
                    worst = max(worst, (ratio - 1).abs().max().item())
        return worst

    def _window_not_finite(self, losses: torch.Tensor, steps: list[torch.Tensor], epoch: int) -> bool:
        """Whether any loss of an optimizer step's window (``[n]`` on the host) is non-finite; with
        train.on_nonfinite='raise' that is an error naming the first such window's sampling steps."""
        finite = torch.isfinite(losses)
        if bool(finite.all()):
            return False
        where = f" (sampling step {steps[int((~finite).nonzero()[0])].tolist()})"
        return not self._finite(losses, "loss", epoch, where)

    def _finite(self, value: torch.Tensor, what: str, epoch: int, step: str = "") -> bool:
        """Whether ``value`` is finite; with train.on_nonfinite='raise' a non-finite value is an error instead."""
        if bool(torch.isfinite(torch.as_tensor(value)).all()):
            return True
        if self.config.train.on_nonfinite == "skip":
            return False
        raise FloatingPointError(
            f"non-finite {what} at epoch {epoch}, optimizer step {self.global_step}{step}; nothing was saved from "
            "this epoch (the last checkpoint is intact). Lower train.lr, tighten train.clip_range, check the reward "
            "for extreme values, or set train.on_nonfinite=skip to skip such steps and count them."
        )
