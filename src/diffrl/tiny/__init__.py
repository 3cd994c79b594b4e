"""The embedded default: the shapes world, its prompts, and the tiny Stable Diffusion diffrl ships."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def tiny_sd_path() -> Path:
    """The directory of the shipped tiny Stable Diffusion (diffusers layout)."""
    path = Path(str(resources.files("diffrl.tiny").joinpath("sd")))
    if not (path / "model_index.json").exists():
        raise FileNotFoundError(
            f"the embedded tiny model is missing from {path}; reinstall diffrl, or rebuild it with "
            "`python scripts/pretrain_tiny.py --out src/diffrl/tiny/sd`."
        )
    return path
