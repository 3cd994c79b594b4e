"""Where a run's settings and prompts come from: recipe files (a ``config()`` function) and prompt lists (the
shapes world's shipped ones or a text file). Below the command line, the trainers, evaluation and sweeps, which
all use it.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from pathlib import Path

from diffrl.config import Config, ConfigError


def load_recipe(path: str) -> Callable[[], Config]:
    """The ``config`` function of a recipe file; calling it checks that it returns a :class:`Config`."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"recipe {path!r} does not exist; give a file such as recipes/grpo_tiny.py.")
    spec = importlib.util.spec_from_file_location(f"diffrl_recipe_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as error:
        raise ConfigError(f"recipe {path!r} has a syntax error at line {error.lineno}: {error.msg}.") from None
    except Exception as error:
        raise ConfigError(f"recipe {path!r} failed to load: {type(error).__name__}: {error}") from None
    config_fn = getattr(module, "config", None)
    if not callable(config_fn):
        raise ConfigError(f"recipe {path!r} defines no config() function returning a diffrl Config.")
    return functools.partial(call_config, config_fn, f"recipe {path!r}")


def call_config(config_fn: Callable[[], Config], where: str) -> Config:
    """``config_fn()``, checked: an exception or anything but a :class:`Config` is a :class:`ConfigError`."""
    try:
        config = config_fn()
    except ConfigError:
        raise
    except Exception as error:
        raise ConfigError(f"{where}: config() raised {type(error).__name__}: {error}") from None
    if not isinstance(config, Config):
        raise ConfigError(f"{where}: config() returned {type(config).__name__}; it must return a diffrl Config.")
    return config


def load_prompts(source: str) -> list[str]:
    """``tiny:train`` / ``tiny:heldout`` (the shapes world's shipped lists) or a text file, one prompt a line."""
    if source.startswith("tiny:"):
        from diffrl.tiny.world import load_prompts as load_tiny

        return load_tiny(source.removeprefix("tiny:"))
    path = Path(source).expanduser()
    if path.is_dir():
        raise ConfigError(f"prompt file {source!r} is a directory; give a text file, one prompt a line.")
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {source!r} does not exist; give a text file or 'tiny:train'.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"prompt file {source!r} is not UTF-8 text (byte {error.start}: {error.reason}); save it as UTF-8."
        ) from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"prompt file {source!r} has no prompts; write one prompt a line.")
    return prompts


def load_eval_prompts(config: Config) -> list[str]:
    """The held-out prompts a run evaluates on: ``eval.num_prompts`` of ``prompts.eval`` spread evenly over the list,
    in its order (0 or more than it holds: all). A list grouped by kind (the embedded world's is) is then sampled
    across every kind, where its first N would be mostly one."""
    prompts = load_prompts(config.prompts.eval)
    n = config.eval.num_prompts
    if n == 0 or n >= len(prompts):
        return prompts
    return [prompts[i * len(prompts) // n] for i in range(n)]
