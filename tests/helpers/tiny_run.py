"""Run a small training job on a given model directory: used by tests as a subprocess (plain or accelerate launch).

python tests/helpers/tiny_run.py MODEL_DIR OUTPUT_DIR [--section.key value ...]
"""

import sys

from diffrl.config import Config, apply_overrides
from diffrl.trainers import train


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


if __name__ == "__main__":
    model_dir, output_dir, *rest = sys.argv[1:]
    resume = None
    if "--resume" in rest:
        i = rest.index("--resume")
        resume = rest[i + 1]
        rest = rest[:i] + rest[i + 2 :]
    train(apply_overrides(small_config(model_dir, output_dir), rest), resume=resume)
