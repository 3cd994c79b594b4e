"""What every trainer's loop uses besides the maths: the set-up here, and one file per phase: sampling an epoch
(``sampling.py``), the inner training pass (``updates.py``), evaluation and logging (``reporting.py``) and
checkpoints (``checkpoints.py``). The loops themselves live in ``ddpo.py`` and ``grpo.py``.

Determinism: every random choice of an epoch (its prompts, its seeds, the shuffles, the trained timesteps and the
torch RNG that LoRA dropout draws from) is derived from ``(train.seed, epoch, process)``. A run resumed from the
checkpoint of epoch e therefore continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from filelock import FileLock, Timeout

from diffrl import policies
from diffrl.checkpoint import checkpoint_dirs, saved_config, unresumable_differences
from diffrl.config import Config, ConfigError
from diffrl.loading import load_eval_prompts, load_prompts
from diffrl.rewards import Reward, weighted_sum
from diffrl.trainers.checkpoints import CheckpointPhase, prompts_digest
from diffrl.trainers.common import derived_seed
from diffrl.trainers.reporting import ReportingPhase
from diffrl.trainers.sampling import GatheredRewards, Samples, SamplingPhase, concat_trajectories
from diffrl.trainers.updates import UpdatePhase

__all__ = [
    "GatheredRewards", "Samples", "Trainer", "concat_trajectories", "derived_seed", "lock_run_directory", "lr_factor",
]  # fmt: skip


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


SHARDED_LAUNCHES = {"FSDP": "ACCELERATE_USE_FSDP", "DeepSpeed": "ACCELERATE_USE_DEEPSPEED"}  # set by accelerate launch


def check_launch() -> None:
    """Refuse a launch that asked for several processes and got one. ``accelerate launch --num_processes N`` without
    ``--multi_gpu`` (``--cpu`` included) starts ONE process on a machine without GPUs and exits 0, so N processes'
    worth of training silently becomes one; its launcher sets ``MASTER_ADDR`` only when asked for more than one
    process, and never ``WORLD_SIZE``, which every multi-process launcher sets. A sharded launch (FSDP, DeepSpeed) is
    refused too: on a machine without GPUs accelerate would silently run it unsharded, and with GPUs the adapter and
    checkpoint code would see each process's shard."""
    sharded = [name for name, flag in SHARDED_LAUNCHES.items() if os.environ.get(flag, "").lower() in ("true", "1")]
    if sharded:
        raise ConfigError(
            f"this launch asks for {sharded[0]}, which diffrl does not support yet: its adapters, optimizer state "
            "and checkpoints are written from each process's full copy of the LoRA, which sharding would split. "
            "Launch data-parallel processes instead (accelerate launch --multi_gpu --num_processes N RECIPE): "
            "every process keeps the frozen model and the LoRA whole (README: Scale-out)."
        )
    launched_by_accelerate = "ACCELERATE_MIXED_PRECISION" in os.environ
    if launched_by_accelerate and "MASTER_ADDR" in os.environ and "WORLD_SIZE" not in os.environ:
        raise ConfigError(
            "accelerate launch was asked for several processes but started one (without --multi_gpu, "
            "--num_processes N starts a single process when there is no GPU, with --cpu too). Launch N processes "
            "with: accelerate launch --multi_gpu --num_processes N RECIPE, or torchrun --nproc_per_node N RECIPE."
        )


class Trainer(SamplingPhase, UpdatePhase, ReportingPhase, CheckpointPhase):
    """Set-up and shared phases of a policy-gradient run (sampling, updates, reporting, checkpoints: one file
    each). Subclasses write ``train()``, the explicit loop."""

    def __init__(self, config: Config, reward: Reward | dict | str | None = None, resume: str | None = None):
        config.validate()
        check_launch()
        self.started = time.perf_counter()
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
            self.init_tracker()

    def finish(self) -> None:
        """End the run: close trackers and the process group (an open group can abort the interpreter at exit)."""
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        if self.lock is not None:
            self.lock.release()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def epochs(self):
        """The epochs still to train: up to ``train.epochs``, or fewer when ``eval.patience`` stops the run (a
        resumed run that had stopped trains none)."""
        for epoch in range(self.start_epoch, self.config.train.epochs):
            if self.stopped_early():
                if self.is_main:
                    best = self.extra_state["best"]
                    print(
                        f"stopped after epoch {epoch}: eval/{best['metric']} has not beaten its best "
                        f"({best['value']:.4g} after epoch {best['epoch']}) in {best['evaluations_since']} "
                        f"evaluations (eval.patience); that LoRA is in {self.output_dir / 'best'}.",
                        flush=True,
                    )
                return
            yield epoch

    def end_epoch(self, completed: int, metrics: dict[str, float], final: bool) -> None:
        """After ``completed`` epochs: evaluate, keep the best LoRA, log and checkpoint (always at the end of the
        run, an early stop included)."""
        metrics.update(self.maybe_evaluate(completed, final))
        self.track_best(completed, metrics)
        self.log(completed, metrics)
        self.maybe_checkpoint(completed, final or self.stopped_early())

    def epoch_timer(self) -> _Timer:
        return _Timer()


class _Timer:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self.start = now - self.start, now
        return elapsed
