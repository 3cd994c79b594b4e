"""The embedded default: the shapes world, its prompts, and the tiny models diffrl ships."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

BUILD_COMMANDS = {
    "sd": "python scripts/pretrain_tiny.py --out src/diffrl/tiny/sd",
    "flux": "python scripts/pretrain_tiny_flux.py --out src/diffrl/tiny/flux",
}


def tiny_model_path(family: str = "sd") -> Path:
    """The directory of the shipped tiny model of ``family`` ('sd' or 'flux'), in diffusers' layout."""
    if family not in BUILD_COMMANDS:
        raise ValueError(f"no embedded tiny model for family {family!r}; use 'sd' or 'flux'.")
    path = Path(str(resources.files("diffrl.tiny").joinpath(family)))
    if not (path / "model_index.json").exists():
        raise FileNotFoundError(
            f"the embedded tiny {family} model is missing from {path}; reinstall diffrl, or build it with "
            f"`{BUILD_COMMANDS[family]}`."
        )
    return path


def tiny_sd_path() -> Path:
    """The directory of the shipped tiny Stable Diffusion (diffusers layout)."""
    return tiny_model_path("sd")
