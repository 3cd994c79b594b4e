"""tiny_run.py with markers: before each phase it writes ``<markers>/<phase>-<epoch>`` and lingers a moment, so
that a test can kill the process (SIGKILL) inside sampling, training or a checkpoint write.

python tests/helpers/killable_run.py MARKERS_DIR MODEL_DIR OUTPUT_DIR [--resume latest] [--section.key value ...]
"""

import sys
import time
from pathlib import Path

from tiny_run import small_config

from diffrl import checkpoint
from diffrl.config import apply_overrides
from diffrl.trainers import base, train

LINGER_S = 0.4


def mark(markers: Path, name: str) -> None:
    (markers / name).touch()
    time.sleep(LINGER_S)


def instrument(markers: Path) -> None:
    sample_epoch, train_epoch, fsync_tree = base.Trainer.sample_epoch, base.Trainer.train_epoch, checkpoint._fsync_tree

    def sampling(self, epoch, *args, **kwargs):
        mark(markers, f"sampling-{epoch}")
        return sample_epoch(self, epoch, *args, **kwargs)

    def training(self, epoch, *args, **kwargs):
        mark(markers, f"training-{epoch}")
        return train_epoch(self, epoch, *args, **kwargs)

    def writing(directory):
        fsync_tree(directory)  # every file of the checkpoint is in its temporary folder; the rename comes next
        mark(markers, f"checkpoint-{int(directory.name.split('-')[2])}")  # .tmp-epoch-000003-PID

    base.Trainer.sample_epoch, base.Trainer.train_epoch, checkpoint._fsync_tree = sampling, training, writing


if __name__ == "__main__":
    markers, model_dir, output_dir, *rest = sys.argv[1:]
    resume = None
    if "--resume" in rest:
        i = rest.index("--resume")
        resume = rest[i + 1]
        rest = rest[:i] + rest[i + 2 :]
    instrument(Path(markers))
    train(apply_overrides(small_config(model_dir, output_dir), rest), resume=resume)
