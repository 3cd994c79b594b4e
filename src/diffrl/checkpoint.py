"""Checkpoints: written atomically (a temporary folder renamed into place), verified by a manifest of checksums.

Layout of ``<output_dir>/checkpoints/epoch-000010/``::

    adapter/               LoRA weights in diffusers' format (plain ``load_lora_weights`` loads them)
    optimizer.safetensors  optimizer state tensors (Adam moments, step counts)
    optimizer.json         the rest of the optimizer state and the learning-rate scheduler state
    trainer_state.json     completed epochs, optimizer steps, reward statistics
    config.json            the resolved config of the run
    manifest.json          size and SHA-256 of every file above, written last

With ``eval.best_metric`` the run also keeps ``<output_dir>/best/`` (``adapter/`` and ``best.json``), replaced the
same way whenever an evaluation beats the best so far.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from diffrl.config import Config, ConfigError

CHECKPOINT_PREFIX = "epoch-"
BEST = "best"  # <output_dir>/best/: the LoRA of the best evaluation (eval.best_metric)
MANIFEST = "manifest.json"
TENSORS = "trainer_tensors.safetensors"
# files every checkpoint has (the adapter folder holds one weights file, whose name depends on LoRA or full tuning)
REQUIRED_FILES = ("optimizer.safetensors", "optimizer.json", "trainer_state.json", "config.json")
# Keys that may differ between a run and its resumption: where and how it logs, how long it runs, evaluation, and
# settings that change how fast or how checked a step runs but not what it computes. A resume says which changed.
RESUMABLE_DIFFERENCES = (
    "logging.",
    "train.epochs",
    "eval.",
    "model.compile",
    "model.gradient_checkpointing",
    "model.channels_last",
    "reward.overlap",
    "train.check_on_policy",
)


_USE_ANOTHER = " Resume from an earlier checkpoint, or with --resume latest (which skips damaged ones)."


class CorruptCheckpointError(RuntimeError):
    """A checkpoint whose files do not match its manifest, or that has none."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_tree(directory: Path) -> None:
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Completed checkpoint folders (temporary ones excluded), oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX))


def verify_checkpoint(directory: Path) -> None:
    """Raise :class:`CorruptCheckpointError` unless every file listed in the manifest is present and intact."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise CorruptCheckpointError(f"checkpoint {str(directory)!r} has no {MANIFEST}; it was not completed.")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CorruptCheckpointError(f"checkpoint {str(directory)!r} has an unreadable manifest: {error}") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    entries_ok = isinstance(files, dict) and all(
        isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
        for e in files.values()
    )
    listed = set(files) if entries_ok else set()
    missing = [name for name in REQUIRED_FILES if name not in listed]
    if not entries_ok or missing or not any(name.startswith("adapter/") for name in listed):
        what = "no file list" if not entries_ok else f"no entry for {', '.join(missing) or 'the adapter'}"
        raise CorruptCheckpointError(
            f"checkpoint {str(directory)!r} has a damaged {MANIFEST} ({what}), so it cannot be verified.{_USE_ANOTHER}"
        )
    for relative, entry in files.items():
        path = directory / relative
        if not path.is_file():
            raise CorruptCheckpointError(f"checkpoint {str(directory)!r} is missing {relative}.{_USE_ANOTHER}")
        if path.stat().st_size != entry["size"] or _sha256(path) != entry["sha256"]:
            raise CorruptCheckpointError(
                f"checkpoint {str(directory)!r}: {relative} does not match its checksum.{_USE_ANOTHER}"
            )


def _install(tmp: Path, final: Path) -> None:
    """Rename the finished folder ``tmp`` to ``final``, replacing an older ``final`` (renamed aside first, then
    removed: a process killed in between leaves a ``.stale-`` folder that the next write removes)."""
    if final.exists():
        stale = final.with_name(f".stale-{final.name}-{os.getpid()}")
        os.replace(final, stale)
        shutil.rmtree(stale)
    os.replace(tmp, final)


def save_best(output_dir: Path, *, policy, epoch: int, metric: str, value: float) -> Path:
    """``<output_dir>/best/``: the LoRA (``adapter/``, as a checkpoint holds it) after ``epoch`` epochs, when its
    evaluation ``metric`` reached ``value``, the highest of the run so far (``best.json``); replaced atomically."""
    output_dir = Path(output_dir)
    final = output_dir / BEST
    tmp = output_dir / f".tmp-{BEST}-{os.getpid()}"
    for leftover in [*output_dir.glob(f".tmp-{BEST}-*"), *output_dir.glob(f".stale-{BEST}-*")]:
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir()
    try:
        policy.save_adapter(tmp / "adapter")
        (tmp / "best.json").write_text(json.dumps({"epoch": epoch, "metric": metric, "value": value}) + "\n")
        _fsync_tree(tmp)
        _install(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def save_checkpoint(
    output_dir: Path,
    *,
    epoch: int,
    policy,
    optimizer,
    lr_scheduler,
    config: Config,
    state: dict,
    keep_last: int,
    tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the checkpoint of ``epoch`` completed epochs; keep the last ``keep_last`` checkpoints. ``tensors``
    (a trainer's own state, e.g. DiffusionNFT's sampling policy) go to ``trainer_tensors.safetensors``."""
    root = Path(output_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{CHECKPOINT_PREFIX}{epoch:06d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    for leftover in root.glob(".tmp-*"):  # half-written by a process that was killed
        shutil.rmtree(leftover, ignore_errors=True)
    for leftover in root.glob(".stale-*"):  # replaced, and killed before its removal
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir()
    try:
        policy.save_adapter(tmp / "adapter")
        _save_optimizer(tmp, optimizer, lr_scheduler)
        (tmp / "trainer_state.json").write_text(json.dumps({"epoch": epoch, **state}, sort_keys=True))
        if tensors:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / TENSORS)
        config.save(tmp / "config.json")
        files = {
            str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(tmp.rglob("*"))
            if p.is_file()
        }
        (tmp / MANIFEST).write_text(json.dumps({"epoch": epoch, "files": files}, indent=1, sort_keys=True))
        _fsync_tree(tmp)
        _install(tmp, final)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(error):
            previous = checkpoint_dirs(output_dir)
            kept = f"checkpoint {str(previous[-1])!r} is intact" if previous else "no checkpoint exists yet"
            raise OSError(
                errno.ENOSPC,
                f"no space left on the disk while writing checkpoint {final.name} under {str(root)!r}; the partial "
                f"write was removed and {kept}. Free space (or lower logging.keep_last) and continue with "
                "--resume latest.",
            ) from error
        raise
    for old in checkpoint_dirs(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def is_disk_full(error: BaseException) -> bool:
    """An OSError for a full disk or quota, or a library's error that wraps one (safetensors raises
    ``SafetensorError: ... No space left on device (os error 28)``)."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(error)
    return any(marker in text for marker in ("No space left on device", "os error 28", "Disk quota exceeded"))


def _save_optimizer(directory: Path, optimizer, lr_scheduler) -> None:
    """Optimizer and scheduler state as safetensors + JSON: nothing in a checkpoint is a pickle."""
    state = optimizer.state_dict()
    tensors, layout = {}, {}
    for index, entry in state["state"].items():
        layout[str(index)] = {}
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{index}/{name}"] = value.detach().cpu().contiguous()
                layout[str(index)][name] = None  # stored in the safetensors file
            else:
                layout[str(index)][name] = value
    save_file(tensors, directory / "optimizer.safetensors")
    meta = {"param_groups": state["param_groups"], "state": layout, "lr_scheduler": lr_scheduler.state_dict()}
    (directory / "optimizer.json").write_text(json.dumps(meta, sort_keys=True))


def _load_optimizer(directory: Path, optimizer, lr_scheduler) -> None:
    tensors = load_file(directory / "optimizer.safetensors")
    meta = json.loads((directory / "optimizer.json").read_text())
    state = {
        int(index): {name: tensors[f"{index}/{name}"] if value is None else value for name, value in entry.items()}
        for index, entry in meta["state"].items()
    }
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    lr_scheduler.load_state_dict(meta["lr_scheduler"])


def find_checkpoint(output_dir: Path, resume: str) -> Path:
    """``resume`` is ``"latest"`` (the newest intact checkpoint of ``output_dir``) or a checkpoint folder."""
    if resume != "latest":
        directory = Path(resume).expanduser()
        if not directory.is_dir():
            raise FileNotFoundError(
                f"resume checkpoint {resume!r} does not exist; give a checkpoint folder or 'latest'."
            )
        verify_checkpoint(directory)
        return directory
    candidates = checkpoint_dirs(output_dir)
    for directory in reversed(candidates):
        try:
            verify_checkpoint(directory)
        except CorruptCheckpointError as error:
            warnings.warn(f"{error} Using the previous checkpoint.", stacklevel=2)
            continue
        return directory
    if candidates:
        raise CorruptCheckpointError(
            f"--resume latest: none of the {len(candidates)} checkpoint(s) under "
            f"{str(Path(output_dir) / 'checkpoints')!r} is intact; move that folder aside to start the run again, or "
            "choose another logging.output_dir."
        )
    raise FileNotFoundError(
        f"--resume latest: no checkpoint under {str(Path(output_dir) / 'checkpoints')!r} and no run to restart; "
        "start the run without --resume."
    )


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    differences = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict) and not name.startswith("reward.kwargs"):
            differences += config_differences(a, b, f"{name}.")
        elif a != b and not (isinstance(a, list | tuple) and isinstance(b, list | tuple) and list(a) == list(b)):
            differences.append(name)
    return differences


def unresumable_differences(saved: dict, config: Config) -> list[str]:
    """Keys where ``config`` differs from a saved config in a way a resume may not accept (not in
    :data:`RESUMABLE_DIFFERENCES`)."""
    return [key for key in config_differences(saved, config.to_dict()) if not key.startswith(RESUMABLE_DIFFERENCES)]


def saved_config(directory: Path) -> dict:
    """The config a run or checkpoint folder saved, as a dict, with the keys added to diffrl since it was written
    at their defaults, so that comparing it with a current config names only real differences."""
    return Config.load(Path(directory) / "config.json").to_dict()


def load_trainer_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """The trainer tensors a (verified) checkpoint holds; empty when it holds none."""
    path = Path(directory) / TENSORS
    return load_file(path) if path.is_file() else {}


def load_checkpoint(directory: Path, *, policy, optimizer, lr_scheduler, config: Config) -> dict:
    """Restore weights and optimizer state from a verified checkpoint; returns its trainer state.

    The checkpoint's config must match the current one except for logging, ``train.epochs`` and evaluation.
    """
    verify_checkpoint(directory)
    differences = unresumable_differences(saved_config(directory), config)
    if differences:
        raise ConfigError(
            f"checkpoint {str(directory)!r} was written by a run with a different config ({', '.join(differences)}); "
            "resume with the same settings, or start a new run in another logging.output_dir."
        )
    policy.load_adapter(directory / "adapter")
    _load_optimizer(directory, optimizer, lr_scheduler)
    return json.loads((directory / "trainer_state.json").read_text())
