"""Bad input gets a clear error that says what to change, and nothing on disk is damaged (docs/reliability.md).

Every case runs the training command (``run_recipe``, what ``diffrl train`` and the recipe files call) in-process on
a tiny random-weight SD, next to a finished run whose files are hashed before and compared after.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import safetensors.torch
import torch
from filelock import FileLock
from safetensors import SafetensorError
from safetensors.torch import load_file
from tiny_run import small_config

from diffrl import checkpoint as checkpoint_module
from diffrl.checkpoint import verify_checkpoint
from diffrl.cli import run_recipe
from diffrl.config import apply_overrides
from diffrl.rewards.server import serve
from diffrl.trainers import base, sampling, train

SWITCHABLE_REWARD = """
import pathlib, torch
MODE = pathlib.Path(__file__).with_name("mode.txt")

def score(images, prompts, metadata):
    mode = MODE.read_text().strip()
    if mode == "nan":
        return torch.full((len(prompts),), float("nan"))
    if mode == "shape":
        return torch.zeros(len(prompts), 2)
    if mode == "raise":
        raise RuntimeError("the scorer lost its GPU")
    if mode == "exit":
        raise SystemExit(0)
    return images.mean(dim=(1, 2, 3))
"""


@dataclass
class Setup:
    root: Path
    model: Path
    run: Path  # a finished one-epoch run with one checkpoint
    reward_file: Path

    def mode(self, mode: str) -> None:
        (self.reward_file.parent / "mode.txt").write_text(mode)


@dataclass
class Attempt:
    argv: list[str]
    output_dir: Path
    watched: Path  # a directory whose files must be unchanged afterwards
    cleanup: list[Callable[[], None]] = field(default_factory=list)
    metrics_may_grow: bool = False  # the epoch that failed logged its metrics before its checkpoint was written


def recipe_for(setup: Setup, output_dir: Path) -> Callable:
    def config():
        config = small_config(str(setup.model), str(output_dir))
        return apply_overrides(config, ["--train.epochs", "1", "--reward.spec", f"{setup.reward_file}:score"])

    return config


@pytest.fixture(scope="module")
def setup(random_sd_dir, tmp_path_factory) -> Setup:
    root = tmp_path_factory.mktemp("reliability")
    reward_file = root / "rewards" / "switchable.py"
    reward_file.parent.mkdir()
    reward_file.write_text(SWITCHABLE_REWARD)
    setup = Setup(root=root, model=random_sd_dir, run=root / "run", reward_file=reward_file)
    setup.mode("ok")
    assert run_recipe(recipe_for(setup, setup.run), [], "train") == 0
    return setup


def snapshot(directory: Path) -> dict[str, str]:
    """Every file's hash; the run's lock file (empty, made by the first command in a folder) is not data."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def copy_of_run(setup: Setup, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(setup.run, copy)
    return copy


def rewrite_checkpoint_file(checkpoint: Path, relative: str, text: str) -> None:
    """Change a checkpoint file and its manifest entry, as a run with other settings would have written it."""
    (checkpoint / relative).write_text(text)
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    data = (checkpoint / relative).read_bytes()
    manifest["files"][relative] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


def dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fresh(setup: Setup, tmp_path: Path, *argv: str) -> Attempt:
    """A new run in its own directory; the finished run beside it must stay as it was."""
    return Attempt(list(argv), tmp_path / "new", setup.run)


def on_finished_run(setup: Setup, *argv: str) -> Attempt:
    """A command aimed at the finished run's directory."""
    return Attempt(list(argv), setup.run, setup.run)


def resume_with_reward(mode: str):
    def case(setup: Setup, tmp_path: Path) -> Attempt:
        setup.mode(mode)
        attempt = on_finished_run(setup, "--resume", "latest", "--train.epochs", "2")
        attempt.cleanup.append(lambda: setup.mode("ok"))
        return attempt

    return case


def slow_server(setup: Setup, tmp_path: Path) -> Attempt:
    def slow(images, prompts, metadata):
        time.sleep(1.0)
        return torch.zeros(len(prompts))

    server = serve(slow, "slow")
    kwargs = json.dumps({"remote": {"url": server.url, "timeout": 0.2, "retries": 1, "backoff": 0}})
    attempt = fresh(setup, tmp_path, "--reward.spec", "remote", "--reward.kwargs", kwargs)
    attempt.cleanup.append(lambda: (time.sleep(1.2), server.shutdown(), server.server_close()))
    return attempt


def different_process_count(setup: Setup, tmp_path: Path) -> Attempt:
    copy = copy_of_run(setup, tmp_path)
    checkpoint = copy / "checkpoints" / "epoch-000001"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    rewrite_checkpoint_file(checkpoint, "trainer_state.json", json.dumps({**state, "num_processes": 2}))
    return Attempt(["--resume", "latest", "--train.epochs", "2"], copy, copy)


def corrupt_checkpoint_named(setup: Setup, tmp_path: Path) -> Attempt:
    copy = copy_of_run(setup, tmp_path)
    checkpoint = copy / "checkpoints" / "epoch-000001"
    weights = checkpoint / "adapter" / "pytorch_lora_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a truncated copy
    return Attempt(["--resume", str(checkpoint), "--train.epochs", "2"], copy, copy)


def disk_full(setup: Setup, tmp_path: Path) -> Attempt:
    original = checkpoint_module.save_file

    def full_disk(tensors, path, *args, **kwargs):
        Path(path).write_bytes(b"\x00" * 10)  # a part of the file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    checkpoint_module.save_file = full_disk
    attempt = on_finished_run(setup, "--resume", "latest", "--train.epochs", "2")
    attempt.cleanup.append(lambda: setattr(checkpoint_module, "save_file", original))
    attempt.metrics_may_grow = True
    return attempt


def disk_full_in_safetensors(setup: Setup, tmp_path: Path) -> Attempt:
    """The adapter is written by diffusers through safetensors, whose full-disk error is not an OSError."""
    original = safetensors.torch.save_file

    def full_disk(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"\x00" * 10)
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
                              'space left on device" })')  # fmt: skip

    safetensors.torch.save_file = full_disk
    attempt = on_finished_run(setup, "--resume", "latest", "--train.epochs", "2")
    attempt.cleanup.append(lambda: setattr(safetensors.torch, "save_file", original))
    attempt.metrics_may_grow = True
    return attempt


def prompt_file(text: str | bytes | None, directory: bool = False):
    def case(setup: Setup, tmp_path: Path) -> Attempt:
        path = tmp_path / "prompts.txt"
        if directory:
            path.mkdir()
        elif isinstance(text, bytes):
            path.write_bytes(text)
        elif text is not None:
            path.write_text(text)
        return fresh(setup, tmp_path, "--prompts.train", str(path))

    return case


def directory_in_use(setup: Setup, tmp_path: Path) -> Attempt:
    """Another run holds the folder's lock (this test takes it, as a second process would)."""
    attempt = fresh(setup, tmp_path)
    attempt.output_dir.mkdir(parents=True)
    lock = FileLock(attempt.output_dir / ".lock", timeout=0)
    lock.acquire()
    attempt.cleanup.append(lock.release)
    return attempt


def model_without_index(setup: Setup, tmp_path: Path) -> Attempt:
    folder = tmp_path / "unet_only"
    shutil.copytree(setup.model / "unet", folder / "unet")
    return fresh(setup, tmp_path, "--model.path", str(folder))


# (case, what the command is given, the message it must print: what is wrong and what to change)
CASES = {
    "negative eta": (
        lambda s, t: fresh(s, t, "--sample.eta", "-0.5"),
        r"sample.eta must be a finite number >= 0.*got -0.5",
    ),
    "NaN eta": (lambda s, t: fresh(s, t, "--sample.eta", "nan"), r"sample.eta must be a finite number >= 0"),
    "eta 0 for training": (lambda s, t: fresh(s, t, "--sample.eta", "0"), r"set sample.eta > 0"),
    "zero steps": (lambda s, t: fresh(s, t, "--sample.num_steps", "0"), r"sample.num_steps must be >= 1"),
    "batch not a multiple of the group": (
        lambda s, t: fresh(s, t, "--sample.batch_size", "6"),
        r"sample.batch_size \(6\) must be a multiple of train.group_size \(4\)",
    ),
    "resumed on another number of processes": (
        different_process_count,
        r"written by a run on 2 process\(es\) but this one has 1.*Resume with 2 process\(es\)",
    ),
    "unknown config key": (lambda s, t: fresh(s, t, "--sample.etta", "1"), r"did you mean 'sample.eta'"),
    "wrong type": (lambda s, t: fresh(s, t, "--sample.num_steps", "ten"), r"sample.num_steps must be an integer"),
    "empty prompt file": (prompt_file(""), r"has no prompts; write one prompt a line"),
    "missing prompt file": (prompt_file(None), r"does not exist; give a text file or 'tiny:train'"),
    "unknown reward name": (
        lambda s, t: fresh(s, t, "--reward.spec", "aesthetc"),
        r"unknown reward 'aesthetc'; did you mean 'aesthetic'\?.*Use a registry name",
    ),
    "reward file.py:function that does not exist": (
        lambda s, t: fresh(s, t, "--reward.spec", f"{s.reward_file}:nope"),
        r"switchable.py' has no 'nope'.*it defines: score",
    ),
    "reward file that does not exist": (
        lambda s, t: fresh(s, t, "--reward.spec", f"{t / 'missing.py'}:score"),
        r"reward file .*missing.py' does not exist",
    ),
    "reward returns NaN": (resume_with_reward("nan"), r"returned non-finite scores.*set reward.on_invalid='drop'"),
    "reward returns the wrong shape": (resume_with_reward("shape"), r"returned shape \(8, 2\).*one score per image"),
    "reward raises": (resume_with_reward("raise"), r"raised RuntimeError: the scorer lost its GPU"),
    "reward arguments that do not fit": (
        lambda s, t: fresh(s, t, "--reward.spec", "remote", "--reward.kwargs", '{"remote": {"timeout": 5}}'),
        r"reward 'remote' needs \['url'\].*Give them in reward.kwargs",
    ),
    "reward server down": (
        lambda s, t: fresh(
            s,
            t,
            "--reward.spec",
            "remote",
            "--reward.kwargs",
            json.dumps({"remote": {"url": f"http://127.0.0.1:{dead_port()}", "retries": 1, "backoff": 0}}),
        ),
        r"did not answer after 2 attempts.*diffrl serve-reward",
    ),
    "reward server too slow": (
        slow_server,
        r"did not answer after 2 attempts \(last: timed out\).*running but slow: raise the client's timeout",
    ),
    "missing model directory": (
        lambda s, t: fresh(s, t, "--model.path", str(t / "no-model")),
        r"model directory .* does not exist; give a diffusers-layout directory",
    ),
    "model directory of the wrong layout": (model_without_index, r"no model_index.json.*save_pretrained"),
    "LoRA rank 0": (lambda s, t: fresh(s, t, "--lora.rank", "0"), r"lora.rank must be a positive integer"),
    "resume with a different config": (
        lambda s, t: on_finished_run(s, "--resume", "latest", "--train.lr", "0.5"),
        r"different config \(train.lr\); resume with the same settings",
    ),
    "--resume latest with no checkpoints": (
        lambda s, t: Attempt(["--resume", "latest"], t / "empty", s.run),
        r"no checkpoint under .* and no run to restart; start the run without --resume",
    ),
    "corrupt checkpoint named for resume": (
        corrupt_checkpoint_named,
        r"does not match its checksum.*--resume latest",
    ),
    "a new run into a finished run's directory": (
        lambda s, t: on_finished_run(s),
        r"already holds a run.*--resume latest, or choose another logging.output_dir",
    ),
    "reward calls sys.exit": (resume_with_reward("exit"), r"reward .* raised SystemExit"),
    "NaN gradient clipping norm": (
        lambda s, t: fresh(s, t, "--train.max_grad_norm", "nan"),
        r"train.max_grad_norm must be a positive finite number",
    ),
    "negative gradient clipping norm": (
        lambda s, t: fresh(s, t, "--train.max_grad_norm", "-1"),
        r"train.max_grad_norm must be a positive finite number.*reverses every update",
    ),
    "Adam epsilon 0": (lambda s, t: fresh(s, t, "--train.adam_eps", "0"), r"train.adam_eps must be > 0"),
    "Adam beta of 1.5": (
        lambda s, t: fresh(s, t, "--train.adam_betas", "1.5,0.999"),
        r"train.adam_betas must be two numbers in \[0, 1\)",
    ),
    "negative weight decay": (
        lambda s, t: fresh(s, t, "--train.weight_decay", "-5"),
        r"train.weight_decay must be >= 0",
    ),
    "negative seed": (lambda s, t: fresh(s, t, "--train.seed", "-1"), r"train.seed must be >= 0"),
    "GRPO with groups of one": (
        lambda s, t: fresh(s, t, "--train.group_size", "1"),
        r"train.group_size must be >= 2 for GRPO",
    ),
    "eta too small to train on": (
        lambda s, t: fresh(s, t, "--sample.eta", "1e-30"),
        r"sample.eta=1e-30 is too small to train on.*use sample.eta >= 0.001",
    ),
    "prompt file not UTF-8": (prompt_file(b"a red circle\n\xff\xfe blue\n"), r"is not UTF-8 text.*save it as UTF-8"),
    "a directory as the prompt file": (prompt_file(None, directory=True), r"is a directory; give a text file"),
    "output directory in use by another run": (directory_in_use, r"is in use by another run that is still going"),
    # last: these leave the failed epoch's line in the finished run's metrics.jsonl, which a later resume trims
    "disk full while checkpointing": (
        disk_full,
        r"no space left on the disk while writing checkpoint epoch-000002.*epoch-000001' is intact.*--resume latest",
    ),
    "disk full while safetensors writes the adapter": (
        disk_full_in_safetensors,
        r"no space left on the disk while writing checkpoint epoch-000002.*epoch-000001' is intact.*--resume latest",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_a_clear_error_and_damages_nothing(name, setup, tmp_path, capsys):
    prepare, message = CASES[name]
    attempt = prepare(setup, tmp_path)
    before = snapshot(attempt.watched)
    try:
        status = run_recipe(recipe_for(setup, attempt.output_dir), attempt.argv, "train")
    finally:
        for undo in attempt.cleanup:
            undo()
    printed = capsys.readouterr().err
    assert status != 0, f"{name}: the command succeeded"
    assert "Traceback" not in printed and re.search(r"^train: (config )?error: ", printed, flags=re.MULTILINE), (
        f"{name}: no one-line error message:\n{printed}"
    )
    assert re.search(message, printed, flags=re.IGNORECASE | re.DOTALL), f"{name}: unclear message:\n{printed}"
    after = snapshot(attempt.watched)
    if attempt.metrics_may_grow:
        grown = (attempt.watched / "metrics.jsonl").read_text()
        assert grown.startswith((setup.run / "metrics.jsonl").read_text())
        before.pop("metrics.jsonl"), after.pop("metrics.jsonl")
    assert after == before, f"{name}: files changed on disk"
    for directory in (attempt.watched, attempt.output_dir):
        for checkpoint in (directory / "checkpoints").glob("*"):
            if checkpoint.name != "epoch-000001" or name != "corrupt checkpoint named for resume":
                verify_checkpoint(checkpoint)  # every checkpoint left on disk is complete


def test_the_table_has_at_least_fifteen_kinds_and_is_documented():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "reliability.md").read_text()
    assert len(CASES) >= 15
    missing = [name for name in CASES if f"| {name} |" not in doc]
    assert not missing, f"docs/reliability.md lacks rows for {missing}"


KILLABLE = Path(__file__).resolve().parent / "helpers" / "killable_run.py"


def _trained(run: Path, epoch: int) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"epoch-{epoch:06d}" / "adapter" / "pytorch_lora_weights.safetensors")


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in rows]


@pytest.mark.slow
def test_runs_killed_at_random_points_resume_to_the_same_weights_and_metrics(random_sd_dir, tmp_path):
    """SIGKILL inside sampling, inside training and inside a checkpoint write (after its files, before its rename);
    each time the run is restarted with --resume latest. It ends where an uninterrupted run ends, bitwise."""
    epochs = 4
    settings = ["--train.epochs", str(epochs), "--train.algorithm", "ddpo_is", "--train.num_inner_epochs", "2",
                "--reward.spec", "rewards_helpers:brightness"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(KILLABLE.parent), "OMP_NUM_THREADS": "1"}

    def start(run: Path, markers: Path) -> subprocess.Popen:
        markers.mkdir()
        resume = ["--resume", "latest"] if list((run / "checkpoints").glob("epoch-*")) else []
        command = [sys.executable, str(KILLABLE), str(markers), str(random_sd_dir), str(run), *settings, *resume]
        log = open(markers / "log.txt", "w")  # noqa: SIM115 (closed when the process ends)
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)

    full, killed = tmp_path / "full", tmp_path / "killed"
    uninterrupted = start(full, tmp_path / "markers-full")  # beside the killed runs: each has one thread

    rng = random.Random(20261124)
    plan = [("sampling", rng.choice([0, 1])), ("training", 2), ("checkpoint", rng.choice([3, 4]))]
    for i, (phase, epoch) in enumerate(plan):
        markers = tmp_path / f"markers-{i}"
        process = start(killed, markers)
        target = markers / f"{phase}-{epoch}"
        deadline = time.monotonic() + 600
        while not target.exists():
            assert process.poll() is None, f"the run ended before {target.name}:\n" + (markers / "log.txt").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))  # somewhere inside the phase (the helper lingers 0.4 s at its start)
        assert process.poll() is None
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert list((killed / "checkpoints").glob(".tmp-*")), "the last kill was meant to leave a half-written checkpoint"
    process = start(killed, tmp_path / "markers-final")
    assert process.wait(timeout=600) == 0, (tmp_path / "markers-final" / "log.txt").read_text()[-3000:]
    assert uninterrupted.wait(timeout=600) == 0, (tmp_path / "markers-full" / "log.txt").read_text()[-3000:]

    a, b = _trained(full, epochs), _trained(killed, epochs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _metrics(killed) == _metrics(full)
    assert not list((killed / "checkpoints").glob(".tmp-*"))


def _poison_loss(monkeypatch, at_calls: set[int]) -> None:
    """The loss of the given step_loss calls (0-based) becomes NaN."""
    original, calls = base.Trainer.step_loss, [0]

    def step_loss(self, *args, **kwargs):
        loss, kl, log_prob = original(self, *args, **kwargs)
        if calls[0] in at_calls:
            loss = dataclasses.replace(loss, loss=loss.loss * float("nan"))
        calls[0] += 1
        return loss, kl, log_prob

    monkeypatch.setattr(base.Trainer, "step_loss", step_loss)


def _poison_log_probs(monkeypatch, rows: list[int]) -> None:
    """The first stochastic step's log-probability of the given rows of every sampling batch becomes NaN."""
    original = sampling.rollout

    def rollout(*args, **kwargs):
        trajectory = original(*args, **kwargs)
        first = int(trajectory.sde_mask.nonzero()[0])
        trajectory.log_probs[rows, first] = float("nan")
        return trajectory

    monkeypatch.setattr(sampling, "rollout", rollout)


def test_a_non_finite_loss_stops_the_step_naming_epoch_and_step(random_sd_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    config = apply_overrides(small_config(str(random_sd_dir), str(run)), ["--train.epochs", "1"])
    _poison_loss(monkeypatch, {1})
    with pytest.raises(FloatingPointError, match=r"non-finite loss at epoch 0, optimizer step 0 \(sampling step \["):
        train(config, reward=lambda images, prompts, metadata: images.mean(dim=(1, 2, 3)))
    assert not (run / "checkpoints").exists()


def test_a_non_finite_log_probability_stops_sampling_naming_the_step(random_sd_dir, tmp_path, monkeypatch):
    config = apply_overrides(small_config(str(random_sd_dir), str(tmp_path / "run")), ["--train.epochs", "1"])
    _poison_log_probs(monkeypatch, [3])
    with pytest.raises(FloatingPointError, match=r"non-finite log-probability at epoch 0, sampling step\(s\) \[0\]"):
        train(config, reward=lambda images, prompts, metadata: images.mean(dim=(1, 2, 3)))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_skip_mode_skips_and_counts_non_finite_steps_and_samples(random_sd_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    overrides = ["--train.epochs", "2", "--train.on_nonfinite", "skip", "--train.batch_size", "4"]
    config = apply_overrides(small_config(str(random_sd_dir), str(run)), overrides)
    _poison_loss(monkeypatch, {0})  # the first of the two optimizer steps of epoch 0
    _poison_log_probs(monkeypatch, [5])
    train(config, reward=lambda images, prompts, metadata: images.mean(dim=(1, 2, 3)))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["train/skipped_steps"] for row in rows] == [1, 0]
    assert [row["sample/nonfinite_log_probs"] for row in rows] == [1, 1]
    # 7 of 8 samples are usable: one optimizer step of 4 an epoch, and the first one was skipped
    assert [row["global_step"] for row in rows] == [0, 1]
    weights = _trained(run, 2)
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_a_trained_checkpoint_holds_no_pickle(setup):
    """Weights and optimizer state are safetensors, everything else JSON: resuming never unpickles anything."""
    checkpoint = setup.run / "checkpoints" / "epoch-000001"
    suffixes = {p.suffix for p in checkpoint.rglob("*") if p.is_file()}
    assert suffixes == {".safetensors", ".json"}
    assert load_file(checkpoint / "optimizer.safetensors")  # the Adam moments of a trained run
