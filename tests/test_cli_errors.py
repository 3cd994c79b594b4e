"""One-line errors where the command line used to print a traceback, and what a saved run may not do on its own:
recipes that do not load, `diffrl eval` of a missing, damaged or code-running checkpoint, a run killed before its
first checkpoint, weights that went non-finite, a batch whose every reward was dropped, Ctrl-C."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from tiny_run import small_config

from diffrl.cli import main as cli_main
from diffrl.cli import run_recipe
from diffrl.config import ConfigError, apply_overrides
from diffrl.sweep import run_sweep
from diffrl.trainers import base, make_trainer, train


def brightness(images, prompts, metadata):
    return images.mean(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def finished(random_sd_dir, tmp_path_factory):
    """A finished one-epoch run whose config names a reward file (as a run from elsewhere could)."""
    root = tmp_path_factory.mktemp("cli")
    reward_file = root / "reward.py"
    reward_file.write_text(
        "import pathlib\n\n\ndef score(images, prompts, metadata):\n"
        "    pathlib.Path(__file__).with_name('ran').touch()\n    return images.mean(dim=(1, 2, 3))\n"
    )
    run = root / "run"
    config = apply_overrides(
        small_config(str(random_sd_dir), str(run)), ["--train.epochs", "1", "--reward.spec", f"{reward_file}:score"]
    )
    train(config)
    (root / "ran").unlink()
    return run, reward_file


RECIPES = {
    "syntax error": ("def config(:\n", r"syntax error at line 1"),
    "missing import": ("import no_such_module_here\n", r"failed to load: ModuleNotFoundError"),
    "config() returns a dict": ("def config():\n    return {'train': {}}\n", r"config\(\) returned dict"),
    "config() returns None": ("def config():\n    pass\n", r"config\(\) returned NoneType"),
    "config() raises": ("def config():\n    raise KeyError('lr')\n", r"config\(\) raised KeyError: 'lr'"),
}


@pytest.mark.parametrize("name", list(RECIPES))
def test_a_broken_recipe_is_a_one_line_error(name, tmp_path, capsys):
    text, message = RECIPES[name]
    recipe = tmp_path / "recipe.py"
    recipe.write_text(text)
    assert cli_main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("diffrl train") and f"recipe {str(recipe)!r}" in err and re.search(message, err), err


def test_reward_kwargs_that_are_not_an_object_name_the_reward():
    with pytest.raises(ConfigError, match=r"reward.kwargs\['shapes'\] must be an object of keyword arguments"):
        apply_overrides(small_config("tiny", "unused"), ["--reward.kwargs", '{"shapes": 5}'])


def test_eval_of_a_missing_checkpoint_names_the_flag_not_resume(tmp_path, capsys):
    assert cli_main(["eval", "--checkpoint", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "--checkpoint" in err and "does not exist" in err and "--resume" not in err and "Traceback" not in err


def test_eval_does_not_run_a_reward_file_named_only_by_the_checkpoint(finished, capsys):
    run, reward_file = finished
    assert cli_main(["eval", "--checkpoint", str(run), "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "names reward code to run" in err and f"--reward '{reward_file}:score'" in err
    assert not (reward_file.parent / "ran").exists()
    # named on the command line, it runs
    assert cli_main(["eval", "--checkpoint", str(run), "--steps", "2", "--reward", f"{reward_file}:score"]) == 0
    assert (reward_file.parent / "ran").exists()
    (reward_file.parent / "ran").unlink()


def test_eval_verifies_the_checkpoint_it_is_given(finished, tmp_path, capsys):
    run, _ = finished
    copy = tmp_path / "checkpoint"
    shutil.copytree(run / "checkpoints" / "epoch-000001", copy)
    weights = copy / "adapter" / "pytorch_lora_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\x00" * 8)  # same size, other bytes
    assert cli_main(["eval", "--checkpoint", str(copy), "--steps", "2", "--reward", "shapes"]) == 2
    err = capsys.readouterr().err
    assert "does not match its checksum" in err and "Traceback" not in err


def test_a_run_killed_before_its_first_checkpoint_continues_with_resume_latest(random_sd_dir, tmp_path, capsys):
    run = tmp_path / "run"
    config = apply_overrides(
        small_config(str(random_sd_dir), str(run)),
        ["--train.epochs", "1", "--eval.every_epochs", "1", "--eval.num_prompts", "2"],
    )
    killed = make_trainer(config, reward=brightness)
    killed.evaluate_base_policy()  # the epoch-0 evaluation is logged; then the process dies
    killed.finish()
    assert (run / "metrics.jsonl").read_text() and not (run / "checkpoints").exists()

    with pytest.raises(FileExistsError, match="--resume latest \\(it stopped before its first checkpoint"):
        make_trainer(config, reward=brightness)
    with pytest.raises(ConfigError, match="different config \\(train.lr\\) and no checkpoint"):
        make_trainer(apply_overrides(config, ["--train.lr", "0.5"]), reward=brightness, resume="latest")
    train(config, reward=brightness, resume="latest")
    assert "no checkpoint was written yet; starting the run again from epoch 0" in capsys.readouterr().out
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1] and (run / "checkpoints" / "epoch-000001").is_dir()


def test_a_sweep_rerun_after_a_kill_before_the_first_checkpoint_finishes(random_sd_dir, tmp_path):
    recipe = tmp_path / "recipe.py"
    recipe.write_text(
        "from tiny_run import small_config\n\n\n"
        f"def config():\n    return small_config({str(random_sd_dir)!r}, 'unused')\n"
    )
    overrides = ["--train.epochs", "1", "--eval.every_epochs", "1", "--eval.num_prompts", "2"]
    out = tmp_path / "sweep"
    rows = run_sweep(str(recipe), [1.0], [0], out, overrides, [2])
    run = out / "eta=1" / "seed=0"
    for name in ("result.json",):
        (run / name).unlink()
    shutil.rmtree(run / "checkpoints")  # as if killed after the first evaluation, before any checkpoint
    again = run_sweep(str(recipe), [1.0], [0], out, overrides, [2])
    assert [r["ode_mean"] for r in again] == [r["ode_mean"] for r in rows]


def test_non_finite_weights_are_never_checkpointed(random_sd_dir, tmp_path):
    config = apply_overrides(small_config(str(random_sd_dir), str(tmp_path / "run")), ["--train.epochs", "1"])
    trainer = make_trainer(config, reward=brightness)
    with torch.no_grad():
        trainer.params[0].view(-1)[0] = float("nan")
    with pytest.raises(FloatingPointError, match="hold NaN or inf; no checkpoint was written"):
        trainer.maybe_checkpoint(1, final=True)
    assert not (tmp_path / "run" / "checkpoints").exists()
    trainer.finish()


def test_an_epoch_whose_every_reward_was_dropped_trains_nothing_and_says_so(random_sd_dir, tmp_path):
    config = apply_overrides(
        small_config(str(random_sd_dir), str(tmp_path / "run")), ["--train.epochs", "1", "--reward.on_invalid", "drop"]
    )

    def always_nan(images, prompts, metadata):
        return torch.full((len(prompts),), float("nan"))

    train(config, reward=always_nan)
    metrics = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["reward/dropped"] == 8 and metrics["train/optimizer_steps"] == 0


def test_init_weights_of_another_lora_rank_names_the_setting(random_sd_dir, tmp_path):
    first = apply_overrides(small_config(str(random_sd_dir), str(tmp_path / "a")), ["--train.epochs", "1"])
    train(first, reward=brightness)
    other = apply_overrides(
        small_config(str(random_sd_dir), str(tmp_path / "b")),
        ["--lora.rank", "8", "--model.init_weights", str(tmp_path / "a" / "checkpoints" / "epoch-000001")],
    )
    with pytest.raises(ValueError, match="do not fit this policy's LoRA: .*another lora.rank"):
        make_trainer(other, reward=brightness)


def test_ctrl_c_is_one_line_and_leaves_the_checkpoints_intact(random_sd_dir, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"

    def config():
        return apply_overrides(small_config(str(random_sd_dir), str(run)), ["--reward.spec", "jpeg_compressibility"])

    train_epoch = base.Trainer.train_epoch

    def interrupted(self, epoch, *args, **kwargs):
        if epoch == 1:
            raise KeyboardInterrupt
        return train_epoch(self, epoch, *args, **kwargs)

    monkeypatch.setattr(base.Trainer, "train_epoch", interrupted)
    assert run_recipe(config, [], "train") == 130
    err = capsys.readouterr().err
    assert "interrupted; checkpoints in" in err and "--resume latest" in err and "Traceback" not in err
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["epoch-000001"]
    monkeypatch.setattr(base.Trainer, "train_epoch", train_epoch)
    assert run_recipe(config, ["--resume", "latest"], "train") == 0  # the lock was released with the process's run
    assert (run / "checkpoints" / "epoch-000002").is_dir()


def test_two_trainers_cannot_share_an_output_directory(random_sd_dir, tmp_path):
    config = apply_overrides(small_config(str(random_sd_dir), str(tmp_path / "run")), ["--train.epochs", "1"])
    first = make_trainer(config, reward=brightness)
    with pytest.raises(ConfigError, match="in use by another run"):
        make_trainer(config, reward=brightness)
    first.finish()
    assert Path(tmp_path / "run" / ".lock").exists()


def test_resume_says_what_it_resumed_and_what_changed_and_refuses_edited_prompts(random_sd_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\nthree blue squares\n")
    run = tmp_path / "run"
    config = apply_overrides(
        small_config(str(random_sd_dir), str(run)), ["--train.epochs", "1", "--prompts.train", str(prompts)]
    )
    train(config, reward=brightness)
    capsys.readouterr()

    # settings that change how a step runs, not what it computes, are accepted
    faster = apply_overrides(config, ["--model.gradient_checkpointing", "true", "--train.check_on_policy", "true"])
    make_trainer(faster, reward=brightness, resume="latest").finish()
    out = capsys.readouterr().out
    assert "resumed from epoch-000001 of" in out and "(epoch 1 of 1)" in out
    assert "model.gradient_checkpointing False -> True" in out and "The run is finished; raise --train.epochs" in out

    longer = apply_overrides(config, ["--train.epochs", "2"])
    train(longer, reward=brightness, resume="latest")
    assert "train.epochs 1 -> 2" in capsys.readouterr().out
    assert json.loads((run / "config.json").read_text())["train"]["epochs"] == 2  # current with its checkpoints

    prompts.write_text("a red circle\nfour blue squares\n")
    with pytest.raises(ConfigError, match="training prompts .* are not those checkpoint .* was trained on"):
        make_trainer(apply_overrides(config, ["--train.epochs", "3"]), reward=brightness, resume="latest")


def test_train_takes_a_yaml_or_json_config_file_with_overrides(random_sd_dir, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model:\n  path: {random_sd_dir}\nsample:\n  num_steps: 2\n  batch_size: 8\n  num_batches_per_epoch: 1\n"
        f"train:\n  epochs: 1\n  batch_size: 4\neval:\n  every_epochs: 0\n"
        f"logging:\n  output_dir: {tmp_path / 'a'}\n  progress_bars: false\n"
    )
    assert cli_main(["train", "--config", str(config), "--train.lr", "1e-3", "--reward", "jpeg_compressibility"]) == 0
    saved = json.loads((tmp_path / "a" / "config.json").read_text())
    assert saved["train"]["lr"] == 1e-3 and saved["sample"]["num_steps"] == 2
    # a finished run's config.json runs the same settings again, into another folder
    again = ["train", str(tmp_path / "a" / "config.json"), "--logging.output_dir", str(tmp_path / "b")]
    assert cli_main(again) == 0
    assert json.loads((tmp_path / "b" / "config.json").read_text())["train"]["lr"] == 1e-3
    config.write_text("train:\n  epoch: 3\n")
    assert cli_main(["train", "--config", str(config)]) == 2
    assert "unknown config key 'train.epoch'; did you mean 'train.epochs'" in capsys.readouterr().err


def test_train_help_needs_no_recipe(capsys):
    assert cli_main(["train", "--help"]) == 0
    assert "--sample.eta" in capsys.readouterr().out
    assert cli_main(["train"]) == 2
