"""What every trainer's loop uses besides the maths: set-up, sampling an epoch, the inner training pass, logging,
evaluation and checkpoints. The loops themselves live in ``ddpo.py`` and ``grpo.py``.

Determinism: every random choice of an epoch (its prompts, its seeds, the shuffles, the trained timesteps and the
torch RNG that LoRA dropout draws from) is derived from ``(train.seed, epoch, process)``. A run resumed from the
checkpoint of epoch e therefore continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from filelock import FileLock, Timeout
from PIL import Image

from diffrl import policies
from diffrl.checkpoint import (
    checkpoint_dirs,
    config_differences,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
    saved_config,
    unresumable_differences,
)
from diffrl.config import Config, ConfigError
from diffrl.evaluation import evaluate_with_config
from diffrl.rewards import Reward, weighted_sum
from diffrl.rewards.combine import to_uint8
from diffrl.rewards.server import RemoteReward
from diffrl.sampling.rollout import Trajectory, moving_window, rollout, select_embeds
from diffrl.trainers.common import (
    clipped_surrogate_loss,
    gaussian_kl,
    score_function_loss,
    subsample_timesteps,
)


def load_prompts(source: str) -> list[str]:
    """``tiny:train`` / ``tiny:heldout`` (the shapes world's shipped lists) or a text file, one prompt a line."""
    if source.startswith("tiny:"):
        from diffrl.tiny.world import load_prompts as load_tiny

        return load_tiny(source.removeprefix("tiny:"))
    path = Path(source).expanduser()
    if path.is_dir():
        raise ConfigError(f"prompt file {source!r} is a directory; give a text file, one prompt a line.")
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {source!r} does not exist; give a text file or 'tiny:train'.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"prompt file {source!r} is not UTF-8 text (byte {error.start}: {error.reason}); save it as UTF-8."
        ) from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"prompt file {source!r} has no prompts; write one prompt a line.")
    return prompts


def load_eval_prompts(config: Config) -> list[str]:
    """The held-out prompts a run evaluates on: the first ``eval.num_prompts`` of ``prompts.eval`` (0: all)."""
    prompts = load_prompts(config.prompts.eval)
    return prompts[: config.eval.num_prompts] if config.eval.num_prompts else prompts


def lock_run_directory(output_dir: Path) -> FileLock:
    """An exclusive lock on ``output_dir/.lock``, held while the run lives (the operating system drops it when the
    process ends, however it ends): two runs in one directory would delete each other's checkpoints."""
    lock = FileLock(output_dir / ".lock", timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise ConfigError(
            f"logging.output_dir {str(output_dir)!r} is in use by another run that is still going; wait for it to "
            "end, or give this run another logging.output_dir."
        ) from None
    return lock


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers, the same on every platform and process."""
    return random.Random(":".join(str(p) for p in parts)).getrandbits(63)


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


def lr_factor(config: Config):
    """``step -> learning-rate factor``: linear warm-up, then constant or cosine decay to 0 at the last epoch."""
    cfg, sample = config.train, config.sample
    per_update = cfg.batch_size * cfg.gradient_accumulation_steps
    updates_per_epoch = cfg.num_inner_epochs * (sample.batch_size * sample.num_batches_per_epoch // per_update)
    total = max(1, cfg.epochs * updates_per_epoch)
    warmup = cfg.lr_warmup_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class Trainer:
    """Set-up and shared phases of a policy-gradient run. Subclasses write ``train()``, the explicit loop."""

    def __init__(self, config: Config, reward: Reward | dict | str | None = None, resume: str | None = None):
        config.validate()
        self.config = config
        self.accelerator = Accelerator(
            # without cpu=True a machine with no GPU ignores the launcher's WORLD_SIZE and every process trains alone
            cpu=not torch.cuda.is_available(),
            mixed_precision=config.train.mixed_precision,
            log_with=None if config.logging.tracker == "none" else config.logging.tracker,
            project_dir=config.logging.output_dir,
        )
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched != self.accelerator.num_processes:
            raise RuntimeError(
                f"the launcher started {launched} processes but accelerate formed a group of "
                f"{self.accelerator.num_processes}; check the accelerate config (on CPU: accelerate launch "
                "--multi_gpu --num_processes N) so that the processes do not train independently into one output "
                "directory."
            )
        self.output_dir = Path(config.logging.output_dir)
        self.is_main = self.accelerator.is_main_process
        self.rank = self.accelerator.process_index
        self.world = self.accelerator.num_processes
        # killed before its first checkpoint: continuing the run is starting it again, with the same config
        self.restarting = (
            resume == "latest" and not checkpoint_dirs(self.output_dir) and (self.output_dir / "config.json").exists()
        )
        set_seed(config.train.seed)  # same LoRA initialisation on every process
        self.policy = policies.load(config, self.accelerator.device)
        fresh = resume is None or self.restarting
        if config.model.init_weights and fresh:  # a resumed run restores its own checkpoint's weights
            try:
                self.policy.load_adapter(config.model.init_weights)
            except FileNotFoundError as error:
                raise ConfigError(f"model.init_weights: {error}") from None
        self.reward = weighted_sum(
            reward if reward is not None else config.reward.spec,
            kwargs=config.reward.kwargs if reward is None else None,
            on_invalid=config.reward.on_invalid,
        )
        self.train_prompts = load_prompts(config.prompts.train)
        self.eval_prompts = load_eval_prompts(config) if config.eval.every_epochs > 0 else []
        self.params = self.policy.trainable_parameters()
        optimizer = torch.optim.AdamW(
            self.params,
            lr=config.train.lr,
            betas=config.train.adam_betas,
            weight_decay=config.train.weight_decay,
            eps=config.train.adam_eps,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config))
        self.policy.denoiser, self.optimizer, self.lr_scheduler = self.accelerator.prepare(
            self.policy.model, optimizer, scheduler
        )
        if config.model.compile:  # compile what forward passes call: the (possibly DDP-wrapped) network
            self.policy.denoiser = torch.compile(self.policy.denoiser)
        self.start_epoch = 0
        self.global_step = 0
        self.extra_state: dict = {}
        self.config_changed = False
        self.lock = None
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.lock = lock_run_directory(self.output_dir)
        try:
            self._start(resume)
            self.extra_state["prompts_sha256"] = {"train": prompts_digest(self.train_prompts)}
        except BaseException:
            if self.lock is not None:
                self.lock.release()
            raise
        self.accelerator.wait_for_everyone()

    def _start(self, resume: str | None) -> None:
        """Continue the run in ``output_dir`` (``resume``) or start a new one there; open the trackers."""
        config = self.config
        if self.restarting:
            differences = unresumable_differences(saved_config(self.output_dir), config)
            if differences:
                raise ConfigError(
                    f"{str(self.output_dir)!r} holds a run with a different config ({', '.join(differences)}) and no "
                    "checkpoint; resume with the same settings, or start a new run in another logging.output_dir."
                )
            print(f"{self.output_dir}: no checkpoint was written yet; starting the run again from epoch 0.")
            if self.is_main:
                config.save(self.output_dir / "config.json")
                (self.output_dir / "metrics.jsonl").write_text("")
        elif resume is not None:
            self._resume(resume)
        else:
            self._refuse_to_overwrite()
            if self.is_main:
                config.save(self.output_dir / "config.json")
                (self.output_dir / "metrics.jsonl").write_text("")
        if config.logging.tracker != "none":
            self.accelerator.init_trackers(self.output_dir.name, config=_flat(config.to_dict()))

    # ------------------------------------------------------------------------------------------------------------
    # sampling

    def global_index(self, batch: int, i: int) -> int:
        """Index of local sample ``i`` of sampling batch ``batch`` in the epoch's global list (rank-major per batch),
        so that a run on P processes samples exactly what one process with P-times the batch samples."""
        return (batch * self.world + self.rank) * self.config.sample.batch_size + i

    def sample_epoch(self, epoch: int, prompts_and_seeds) -> Samples:
        """Roll out and score this process's share of the epoch. ``prompts_and_seeds(batch) -> (prompts, seeds,
        step_seeds)`` gives a sampling batch's prompts and seeds. With ``reward.overlap`` a batch is scored in a
        worker thread while the next one is sampled (scores are the same either way)."""
        cfg = self.config.sample
        self.policy.denoiser.eval()
        overlap = self.overlap_scoring()
        trajectories, scored = [], []
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward") as pool:
            for batch in range(cfg.num_batches_per_epoch):
                prompts, seeds, step_seeds = prompts_and_seeds(batch)
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

    # ------------------------------------------------------------------------------------------------------------
    # training

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
        for _ in range(cfg.num_inner_epochs):
            # row and step indices stay on the host: the step maths reads the schedule there (no device sync)
            order = keep[torch.randperm(len(keep), generator=generator)][:usable]
            steps = subsample_timesteps(samples.trajectory.sde_mask, len(order), cfg.timestep_fraction, generator)
            num_micro = len(order) // micro
            window: list[tuple[dict[str, torch.Tensor], torch.Tensor]] = []  # this optimizer step's losses
            for m in range(num_micro):
                rows = order[m * micro : (m + 1) * micro]
                cols = steps[m * micro : (m + 1) * micro]
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

    def _refuse_to_overwrite(self) -> None:
        """A fresh run never truncates the metrics or checkpoints of an earlier run in the same directory."""
        metrics = self.output_dir / "metrics.jsonl"
        checkpoints = bool(checkpoint_dirs(self.output_dir))
        if checkpoints or (metrics.exists() and metrics.stat().st_size > 0):
            again = "" if checkpoints else " (it stopped before its first checkpoint, so it starts again at epoch 0)"
            raise FileExistsError(
                f"logging.output_dir {str(self.output_dir)!r} already holds a run (metrics or checkpoints); continue "
                f"it with --resume latest{again}, or choose another logging.output_dir (nothing there was changed)."
            )

    # ------------------------------------------------------------------------------------------------------------
    # evaluation, logging, checkpoints

    def maybe_evaluate(self, completed: int, final: bool = False) -> dict[str, float]:
        """Evaluate after ``completed`` epochs (0: the base policy) every ``eval.every_epochs`` and at the end."""
        cfg = self.config.eval
        if cfg.every_epochs == 0 or not self.eval_prompts or not (final or completed % cfg.every_epochs == 0):
            return {}
        metrics = {}
        if self.is_main:
            self.policy.denoiser.eval()
            etas = cfg.etas if cfg.etas is not None else (0.0, self.config.sample.eta)
            images: dict[float, torch.Tensor] = {}
            result = evaluate_with_config(
                self.policy, self.config, self.eval_prompts, self.reward, etas=etas, images_out=images
            )
            metrics = result.to_metrics()
            if cfg.grid_prompts:
                self.save_grid(completed, images)
        self.accelerator.wait_for_everyone()
        return metrics

    def save_grid(self, completed: int, images: dict[float, torch.Tensor]) -> None:
        """``samples/epoch-XXXXXX.png``: one row per evaluated eta (same noise), the first ``eval.grid_prompts``
        held-out prompts as columns; also sent to the tracker."""
        rows = [images[eta][: self.config.eval.grid_prompts] for eta in sorted(images)]
        grid = torch.cat([torch.cat(list(row), dim=2) for row in rows], dim=1)  # [3, rows*H, cols*W]
        array = to_uint8(grid.unsqueeze(0))[0]
        (self.output_dir / "samples").mkdir(exist_ok=True)
        Image.fromarray(array).save(self.output_dir / "samples" / f"epoch-{completed:06d}.png")
        caption = "rows: eta " + ", ".join(f"{eta:g}" for eta in sorted(images))
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image("eval/samples", array, completed, dataformats="HWC")
            elif tracker.name == "wandb":
                import wandb

                tracker.run.log({"eval/samples": wandb.Image(array, caption=caption)}, step=completed)

    def evaluate_base_policy(self) -> None:
        """Evaluate and log the policy before any update (a fresh run only; a resumed run already logged it)."""
        if self.start_epoch == 0:
            baseline = self.maybe_evaluate(0)
            if baseline:
                self.log(0, baseline)

    def log(self, completed: int, metrics: dict[str, float]) -> None:
        """One line of ``metrics.jsonl`` (and the console and tracker) for the state after ``completed`` epochs."""
        metrics = {"epoch": completed, "global_step": self.global_step, **metrics}
        if self.is_main:
            with open(self.output_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics, sort_keys=True) + "\n")
            shown = {k: v for k, v in metrics.items() if k.startswith(("reward/", "eval/")) and "stderr" not in k}
            if "train/loss" in metrics:
                shown = {"train/loss": metrics["train/loss"], **shown}
            print(f"epoch {completed}: " + " ".join(f"{k} {v:.4g}" for k, v in shown.items()), flush=True)
        if self.config.logging.tracker != "none":
            self.accelerator.log(metrics, step=completed)

    def maybe_checkpoint(self, completed: int, final: bool = False) -> None:
        """Checkpoint after ``completed`` epochs every ``logging.checkpoint_every`` and at the end."""
        every = self.config.logging.checkpoint_every
        if not (final or (every > 0 and completed % every == 0)):
            return
        self.check_weights(completed)
        self.accelerator.wait_for_everyone()
        if self.is_main:
            save_checkpoint(
                self.output_dir,
                epoch=completed,
                policy=self.policy,
                optimizer=self.optimizer,
                lr_scheduler=self.lr_scheduler,
                config=self.config,
                state={"global_step": self.global_step, "num_processes": self.world, **self.extra_state},
                keep_last=self.config.logging.keep_last,
            )
            if self.config_changed:  # a resume with changed settings: the run's config is its checkpoints' now
                self.config.save(self.output_dir / "config.json")
                self.config_changed = False
        self.accelerator.wait_for_everyone()

    def check_weights(self, completed: int) -> None:
        """Refuse to checkpoint weights that hold NaN or inf: finite gradients can still make them (an optimizer
        setting, an overflow in the update), and a checkpoint of them would replace the last good one."""
        bad = [i for i, p in enumerate(self.params) if not bool(torch.isfinite(p.detach()).all())]
        if bad:
            raise FloatingPointError(
                f"after epoch {completed} {len(bad)} of {len(self.params)} trained weight tensors hold NaN or inf; "
                "no checkpoint was written (the last one is intact). Check train.lr, train.adam_eps and "
                "train.max_grad_norm, or resume from the last checkpoint with a lower train.lr."
            )

    def _resume(self, resume: str) -> None:
        directory = find_checkpoint(self.output_dir, resume)
        state = load_checkpoint(
            directory,
            policy=self.policy,
            optimizer=self.optimizer,
            lr_scheduler=self.lr_scheduler,
            config=self.config,
        )
        self.start_epoch = state.pop("epoch")
        self.global_step = state.pop("global_step")
        written_by = state.pop("num_processes", self.world)
        if written_by != self.world:
            raise ConfigError(
                f"checkpoint {str(directory)!r} was written by a run on {written_by} process(es) but this one has "
                f"{self.world}; sample.batch_size is per process, so the global batch would change. Resume with "
                f"{written_by} process(es) or start a new run in another logging.output_dir."
            )
        trained_on = state.pop("prompts_sha256", {}).get("train")
        if trained_on is not None and trained_on != prompts_digest(self.train_prompts):
            raise ConfigError(
                f"the training prompts ({self.config.prompts.train}) are not those checkpoint {str(directory)!r} was "
                "trained on (the file's contents changed); restore them, or start a new run in another "
                "logging.output_dir."
            )
        self.extra_state = state
        self._report_resume(directory)
        if self.is_main:
            metrics = self.output_dir / "metrics.jsonl"
            lines = metrics.read_text().splitlines() if metrics.exists() else []
            kept = [line for line in lines if _logged_epoch(line) <= self.start_epoch]
            tmp = metrics.with_name(metrics.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, metrics)

    def _report_resume(self, directory: Path) -> None:
        """Say what was resumed, which resumable settings changed (and save the config the run now has), and whether
        the run is already finished."""
        saved, current = saved_config(directory), self.config.to_dict()
        changes = config_differences(saved, current)
        epochs = self.config.train.epochs
        line = f"resumed from {directory.name} of {self.output_dir} (epoch {self.start_epoch} of {epochs})"
        if changes:
            line += "; changed since: " + ", ".join(
                f"{key} {_dotted(saved, key)!r} -> {_dotted(current, key)!r}" for key in changes
            )
            self.config_changed = True  # the run's config.json follows with the next checkpoint
        if self.start_epoch >= epochs:
            line += f". The run is finished; raise --train.epochs above {epochs} to train it further"
        if self.is_main:
            print(line + ".", flush=True)

    def finish(self) -> None:
        """End the run: close trackers and the process group (an open group can abort the interpreter at exit)."""
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        if self.lock is not None:
            self.lock.release()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def epoch_timer(self) -> _Timer:
        return _Timer()


class _Timer:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self.start = now - self.start, now
        return elapsed


def _logged_epoch(line: str) -> float:
    """The epoch of a metrics.jsonl line; a line torn by a killed write counts as after every checkpoint."""
    try:
        return json.loads(line)["epoch"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def _dotted(data: dict, key: str):
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def prompts_digest(prompts: list[str]) -> str:
    """SHA-256 of a prompt list: saved with each checkpoint, so a resume notices an edited prompt file."""
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()


def _flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, int | float | str | bool) else str(value)
    return out
