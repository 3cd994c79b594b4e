"""Run a small training job on a given model directory: used by tests as a subprocess (plain or accelerate launch).

python tests/helpers/tiny_run.py MODEL_DIR OUTPUT_DIR [--resume latest] [--stop-after E] [--section.key value ...]

``--stop-after E`` ends the process right after the checkpoint of epoch E, as a kill there would: the run's config
(its epochs, its learning-rate schedule) stays that of the whole run.
"""

import os
import subprocess
import sys

from diffrl.config import Config, apply_overrides
from diffrl.trainers import base, train


def small_config(model_dir: str, output_dir: str) -> Config:
    overrides = [
        "--model.path", model_dir,
        "--sample.num_steps", "4",
        "--sample.batch_size", "8",
        "--sample.num_batches_per_epoch", "1",
        "--sample.guidance_scale", "2.0",
        "--train.batch_size", "4",
        "--train.group_size", "4",
        "--train.epochs", "2",
        "--train.lr", "1e-2",
        "--train.clip_range", "0.2",
        "--eval.every_epochs", "0",
        "--logging.output_dir", output_dir,
        "--logging.checkpoint_every", "1",
        "--logging.progress_bars", "false",
    ]  # fmt: skip
    return apply_overrides(Config(), overrides)


def pop_option(args: list[str], name: str) -> str | None:
    if name not in args:
        return None
    i = args.index(name)
    value = args[i + 1]
    del args[i : i + 2]
    return value


def stop_after(epoch: int) -> None:
    maybe_checkpoint = base.Trainer.maybe_checkpoint

    def checkpoint_then_stop(self, completed, final=False):
        maybe_checkpoint(self, completed, final)
        if completed == epoch:
            raise SystemExit(0)

    base.Trainer.maybe_checkpoint = checkpoint_then_stop


def run_helpers(*runs: list[str], env_extra: dict | None = None) -> None:
    """Run this script once per argument list, all at the same time, each on one thread (a resume test's
    uninterrupted run beside its interrupted one: most of each process is start-up, which one core serves). Asserts
    that every run succeeds, with the failing one's output."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    processes = [
        subprocess.Popen([sys.executable, __file__, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for args in runs
    ]
    outputs = [process.communicate(timeout=600)[0].decode(errors="replace") for process in processes]
    for args, process, output in zip(runs, processes, outputs, strict=True):
        assert process.returncode == 0, f"{args}:\n{output[-4000:]}"


if __name__ == "__main__":
    model_dir, output_dir, *rest = sys.argv[1:]
    resume = pop_option(rest, "--resume")
    stop = pop_option(rest, "--stop-after")
    if stop is not None:
        stop_after(int(stop))
    train(apply_overrides(small_config(model_dir, output_dir), rest), resume=resume)
