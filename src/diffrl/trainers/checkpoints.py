"""Checkpoints of a run: written every ``logging.checkpoint_every`` epochs after a weight check, and a
resume that restores them exactly (refusing a config that would not continue the same run); the best LoRA by an
evaluation metric (``eval.best_metric``) and the early stop it allows (``eval.patience``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list

from diffrl.checkpoint import (
    checkpoint_dirs,
    config_differences,
    find_checkpoint,
    load_checkpoint,
    load_trainer_tensors,
    save_best,
    save_checkpoint,
    saved_config,
)
from diffrl.config import ConfigError


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


class CheckpointPhase:
    """The checkpoint phase of :class:`~diffrl.trainers.base.Trainer`."""

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
                tensors=self.checkpoint_tensors(),
            )
            if self.config_changed:  # a resume with changed settings: the run's config is its checkpoints' now
                self.config.save(self.output_dir / "config.json")
                self.config_changed = False
        self.accelerator.wait_for_everyone()

    def track_best(self, completed: int, metrics: dict[str, float]) -> None:
        """With ``eval.best_metric``, after an evaluation: save a new best LoRA in ``<run>/best`` or count one more
        evaluation without one. The record is part of the checkpoint's state, so a resumed run keeps it."""
        name = self.config.eval.best_metric
        if not name or "time/eval_s" not in metrics:  # no evaluation this epoch
            return
        best = self.extra_state.get("best")
        if best is not None and best["metric"] != name:
            best = None  # a resume that names another metric starts its record afresh
        if self.is_main:
            if f"eval/{name}" not in metrics:
                logged = sorted(k[5:] for k in metrics if k.startswith("eval/") and "stderr" not in k)
                raise ConfigError(
                    f"eval.best_metric {name!r} is not one of this run's evaluation metrics; choose one of "
                    f"{', '.join(logged)}."
                )
            value = float(metrics[f"eval/{name}"])
            if best is None or value > best["value"]:
                save_best(self.output_dir, policy=self.policy, epoch=completed, metric=name, value=value)
                best = {"metric": name, "epoch": completed, "value": value, "evaluations_since": 0}
            else:
                best = {**best, "evaluations_since": best["evaluations_since"] + 1}
        if self.world > 1:  # every process stops at the same epoch
            best = broadcast_object_list([best])[0]
        self.extra_state["best"] = best

    def stopped_early(self) -> bool:
        """``eval.patience`` evaluations have passed without a new best ``eval.best_metric``."""
        cfg, best = self.config.eval, self.extra_state.get("best")
        return (
            cfg.patience > 0
            and best is not None
            and best["metric"] == cfg.best_metric
            and best["evaluations_since"] >= cfg.patience
        )

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """A trainer's own tensors to checkpoint beside the adapter and optimizer (none here)."""
        return {}

    def restore_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`checkpoint_tensors` saved (called on resume)."""

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
        self.restore_tensors(load_trainer_tensors(directory))
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
