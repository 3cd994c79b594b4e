"""What a run shows: evaluation (the ODE against the training sampler) with its labelled grids, the
metrics line, console progress and the tracker (TensorBoard, W&B).
"""

from __future__ import annotations

import json
import os
import re
import time

import torch
from PIL import Image

from diffrl.evaluation import EvalResult, evaluate_with_config, primary_reward
from diffrl.grids import labelled_grid
from diffrl.rewards.combine import to_uint8


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def _flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, int | float | str | bool) else str(value)
    return out


class ReportingPhase:
    """The evaluation and logging phase of :class:`~diffrl.trainers.base.Trainer`."""

    def init_tracker(self) -> None:
        """TensorBoard logs under ``<run>/<run name>``; W&B writes into the run folder (not the working directory's
        ``./wandb``) and a resumed run continues the same W&B run (its id is kept in ``<run>/wandb_id``)."""
        cfg = self.config.logging
        name = cfg.run_name or self.output_dir.name
        if cfg.tracker == "wandb":
            id_path = self.output_dir / "wandb_id"
            if self.is_main and not id_path.is_file():
                # a W&B id takes letters, digits, - and _
                stem = re.sub(r"[^A-Za-z0-9_-]+", "-", name)[:48].strip("-") or "run"
                id_path.write_text(f"{stem}-{os.urandom(4).hex()}")
            self.accelerator.wait_for_everyone()
            kwargs = {"dir": str(self.output_dir), "name": name, "id": id_path.read_text().strip(), "resume": "allow"}
            if cfg.wandb_entity:
                kwargs["entity"] = cfg.wandb_entity
            self.accelerator.init_trackers(
                cfg.wandb_project, config=_flat(self.config.to_dict()), init_kwargs={"wandb": kwargs}
            )
        else:
            self.accelerator.init_trackers(name, config=_flat(self.config.to_dict()))

    def maybe_evaluate(self, completed: int, final: bool = False) -> dict[str, float]:
        """Evaluate after ``completed`` epochs (0: the base policy) every ``eval.every_epochs`` and at the end."""
        cfg = self.config.eval
        if cfg.every_epochs == 0 or not self.eval_prompts or not (final or completed % cfg.every_epochs == 0):
            return {}
        metrics = {}
        started = time.perf_counter()
        if self.is_main:
            self.policy.denoiser.eval()
            images: dict[str, torch.Tensor] = {}
            result = evaluate_with_config(
                self.policy,
                self.config,
                self.eval_prompts,
                self.reward,
                completed_epochs=completed,
                images_out=images,
                progress=self.config.logging.progress_bars,
            )
            metrics = result.to_metrics()
            if cfg.grid_prompts:
                self.save_grid(completed, result, images)
        self.accelerator.wait_for_everyone()
        metrics["time/eval_s"] = time.perf_counter() - started
        return metrics

    def save_grid(self, completed: int, result: EvalResult, images: dict[str, torch.Tensor]) -> None:
        """``samples/epoch-XXXXXX.png``: one row per evaluated sampler (same noise), the first ``eval.grid_prompts``
        held-out prompts as columns, each tile with its reward; also sent to the tracker, the grid and (W&B) every
        image with its prompt, sampler and reward as captions."""
        n = min(self.config.eval.grid_prompts, len(self.eval_prompts))
        prompts = self.eval_prompts[:n]
        name = primary_reward(self.reward.names)
        titles = {s.label: s.describe(result.num_steps) for s in result.samplers}
        scored = [result.scores.get(name, {}).get(s.label) for s in result.samplers]
        rows = [(titles[s.label], images[s.label][:n]) for s in result.samplers]
        array = labelled_grid(rows, prompts, [None if v is None else v[:n] for v in scored])
        (self.output_dir / "samples").mkdir(exist_ok=True)
        Image.fromarray(array).save(self.output_dir / "samples" / f"epoch-{completed:06d}.png")
        caption = f"after {completed} epochs; rows: " + "; ".join(titles[s.label] for s in result.samplers)
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image("eval/samples", array, completed, dataformats="HWC")
                tracker.writer.add_text("eval/samples_caption", caption, completed)
            elif tracker.name == "wandb":
                import wandb

                tiles = [
                    wandb.Image(
                        to_uint8(images[s.label][i : i + 1])[0],
                        caption=f"{prompts[i]} | {titles[s.label]}"
                        + ("" if values is None else f" | {name} {float(values[i]):.3f}"),
                    )
                    for s, values in zip(result.samplers, scored, strict=True)
                    for i in range(n)
                ]
                tracker.run.log(
                    {"eval/samples": wandb.Image(array, caption=caption), "eval/images": tiles}, step=completed
                )

    def evaluate_base_policy(self) -> None:
        """Evaluate and log the policy before any update (a fresh run only; a resumed run already logged it)."""
        if self.start_epoch == 0:
            baseline = self.maybe_evaluate(0)
            if baseline:
                self.track_best(0, baseline)  # the base policy is the best until an update beats it
                self.log(0, baseline)

    def progress_line(self, completed: int) -> str:
        """``epoch 12/70 (elapsed 3m10s, ETA 15m20s)``: the ETA extrapolates this process's epochs so far."""
        total = self.config.train.epochs
        elapsed = time.perf_counter() - self.started
        done = completed - self.start_epoch
        if done <= 0:
            return f"epoch {completed}/{total}"
        eta = elapsed / done * (total - completed)
        return f"epoch {completed}/{total} (elapsed {_duration(elapsed)}, ETA {_duration(eta)})"

    def log(self, completed: int, metrics: dict[str, float]) -> None:
        """One line of ``metrics.jsonl`` (and the console and tracker) for the state after ``completed`` epochs."""
        metrics = {"epoch": completed, "global_step": self.global_step, **metrics}
        if self.is_main:
            with open(self.output_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics, sort_keys=True) + "\n")
            shown = {k: v for k, v in metrics.items() if k.startswith(("reward/", "eval/")) and "stderr" not in k}
            # an on-policy GRPO loss is ~0 whatever the update does: the gradient norm and the advantages say more
            diagnostics = ("train/grad_norm", "train/advantage_abs_mean", "train/clip_fraction")
            shown = {**{k: metrics[k] for k in diagnostics if k in metrics}, **shown}
            values = " ".join(f"{k} {v:.4g}" for k, v in shown.items())
            print(f"{self.progress_line(completed)}: {values}", flush=True)
        if self.config.logging.tracker != "none":
            self.accelerator.log(metrics, step=completed)
