"""diffrl: fine-tune text-to-image diffusion models with reinforcement learning from reward models."""

__version__ = "0.1.0.dev0"

from diffrl.quiet import install_filters as _install_filters

_install_filters()
