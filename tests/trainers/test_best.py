"""The best LoRA by a held-out metric (eval.best_metric) and the early stop it allows (eval.patience): which epoch is
kept, when the run stops, that a resumed run keeps its record, and that a failed write leaves the last best intact."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_run import small_config

from diffrl.checkpoint import BEST, save_best
from diffrl.config import ConfigError, apply_overrides
from diffrl.trainers import train
from diffrl.trainers.reporting import ReportingPhase

WEIGHTS = "pytorch_lora_weights.safetensors"


def brightness(images, prompts, metadata):
    return images.mean(dim=(1, 2, 3))


def scripted_evaluations(monkeypatch, values: dict[int, float]) -> list[int]:
    """Replace the evaluation by ``values[completed epochs]`` as ``eval/held/ode/mean``; returns the epochs asked."""
    asked = []

    def evaluate(self, completed, final=False):
        asked.append(completed)
        return {"eval/held/ode/mean": values[completed], "eval/held/gap": 0.0, "time/eval_s": 0.0}

    monkeypatch.setattr(ReportingPhase, "maybe_evaluate", evaluate)
    return asked


def logged_epochs(run: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def config_for(random_sd_dir, run: Path, *extra: str):
    return apply_overrides(
        small_config(str(random_sd_dir), str(run)),
        ["--train.epochs", "6", "--eval.every_epochs", "1", "--eval.best_metric", "held/ode/mean",
         "--logging.keep_last", "10", *extra],
    )  # fmt: skip


def test_the_best_lora_is_kept_and_patience_stops_the_run(random_sd_dir, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    scripted_evaluations(monkeypatch, {0: 0.1, 1: 0.2, 2: 0.3, 3: 0.25, 4: 0.5, 5: 0.6, 6: 0.7})
    stopping = ("--eval.patience", "1", "--logging.checkpoint_every", "2")
    train(config_for(random_sd_dir, run, *stopping), reward=brightness)
    # best after epoch 2; epoch 3 does not beat it: the run stops there and checkpoints (not a checkpoint epoch)
    assert logged_epochs(run) == [0, 1, 2, 3]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch-000002", "epoch-000003"]
    assert json.loads((run / BEST / "best.json").read_text()) == {"epoch": 2, "metric": "held/ode/mean", "value": 0.3}
    best = load_file(run / BEST / "adapter" / WEIGHTS)
    epoch_2 = load_file(run / "checkpoints" / "epoch-000002" / "adapter" / WEIGHTS)
    epoch_3 = load_file(run / "checkpoints" / "epoch-000003" / "adapter" / WEIGHTS)
    assert best.keys() == epoch_2.keys()
    assert all(torch.equal(best[k], epoch_2[k]) for k in best)
    assert any(not torch.equal(best[k], epoch_3[k]) for k in best)  # the LoRA moved on after the best
    assert "stopped after epoch 3" in capsys.readouterr().out

    # resumed as it was, the run has stopped: it trains no epoch
    train(config_for(random_sd_dir, run, *stopping), reward=brightness, resume="latest")
    assert logged_epochs(run) == [0, 1, 2, 3]

    # with more patience it continues and keeps its record: epoch 4 beats 0.3, and so on
    train(config_for(random_sd_dir, run, "--eval.patience", "5"), reward=brightness, resume="latest")
    assert logged_epochs(run) == [0, 1, 2, 3, 4, 5, 6]
    assert json.loads((run / BEST / "best.json").read_text())["epoch"] == 6


def test_without_patience_the_run_trains_every_epoch_and_the_base_can_stay_best(random_sd_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    scripted_evaluations(monkeypatch, {0: 0.9, 1: 0.3, 2: 0.2, 3: 0.25, 4: 0.5, 5: 0.6, 6: 0.7})
    train(config_for(random_sd_dir, run), reward=brightness)
    assert logged_epochs(run) == [0, 1, 2, 3, 4, 5, 6]
    assert json.loads((run / BEST / "best.json").read_text())["epoch"] == 0
    best = load_file(run / BEST / "adapter" / WEIGHTS)
    assert all(torch.count_nonzero(v) == 0 for k, v in best.items() if "lora_B" in k or "lora.up" in k)


def test_a_metric_the_run_does_not_log_is_refused_before_training(random_sd_dir, tmp_path):
    config = apply_overrides(
        small_config(str(random_sd_dir), str(tmp_path / "run")),
        ["--eval.every_epochs", "1", "--eval.num_prompts", "2", "--eval.num_steps", "2", "--eval.grid_prompts", "0",
         "--eval.best_metric", "brightnes/ode/mean"],
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"'brightnes/ode/mean' is not one of .*brightness/ode/mean"):
        train(config, reward=brightness)
    assert not (tmp_path / "run" / "checkpoints").exists()


class _Policy:
    def __init__(self, value: str, fail: bool = False):
        self.value, self.fail = value, fail

    def save_adapter(self, directory: Path) -> None:
        directory.mkdir(parents=True)
        (directory / "weights").write_text(self.value)
        if self.fail:
            raise OSError("disk full")


def test_a_failed_write_of_the_best_leaves_the_last_one_intact(tmp_path):
    save_best(tmp_path, policy=_Policy("first"), epoch=2, metric="m", value=0.5)
    with pytest.raises(OSError, match="disk full"):
        save_best(tmp_path, policy=_Policy("second", fail=True), epoch=4, metric="m", value=0.6)
    assert (tmp_path / BEST / "adapter" / "weights").read_text() == "first"
    assert json.loads((tmp_path / BEST / "best.json").read_text())["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [BEST]  # no temporary folder left behind
    save_best(tmp_path, policy=_Policy("third"), epoch=6, metric="m", value=0.7)
    assert (tmp_path / BEST / "adapter" / "weights").read_text() == "third"
