"""Command line: ``diffrl train RECIPE [--resume DIR|latest] [--section.key value ...]``.

A recipe is a Python file with a ``config() -> Config`` function (see ``recipes/``); every config field can be
overridden with a dotted key, e.g. ``diffrl train recipes/grpo_tiny.py --sample.eta 1.2 --train.seed 1``.
Recipes also run on their own: ``python recipes/grpo_tiny.py ...`` or ``accelerate launch recipes/grpo_tiny.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

from diffrl.config import Config, ConfigError, apply_overrides, describe


def load_recipe(path: str) -> Callable[[], Config]:
    """The ``config`` function of a recipe file."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"recipe {path!r} does not exist; give a file such as recipes/grpo_tiny.py.")
    spec = importlib.util.spec_from_file_location(f"diffrl_recipe_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "config", None)):
        raise ConfigError(f"recipe {path!r} defines no config() function returning a diffrl Config.")
    return module.config


def _train_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train with a recipe's config; any config key can be overridden as --section.key VALUE.",
        epilog=describe(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--resume", default=None, help="checkpoint folder, or 'latest' in logging.output_dir")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser


def run_recipe(config_fn: Callable[[], Config], argv: list[str], prog: str) -> int:
    """Resolve a recipe's config with command-line overrides and train (or print it)."""
    from diffrl.trainers import train

    args, overrides = _train_parser(prog).parse_known_args(argv)
    try:
        config = apply_overrides(config_fn(), overrides)
    except ConfigError as error:
        print(f"{prog}: config error: {error}", file=sys.stderr)
        return 2
    if args.print_config:
        import json

        print(json.dumps(config.to_dict(), indent=2, sort_keys=True))
        return 0
    train(config, resume=args.resume)
    return 0


def recipe_main(config_fn: Callable[[], Config]) -> None:
    """Entry point of a recipe file run as a script (``python recipe.py`` or ``accelerate launch recipe.py``)."""
    sys.exit(run_recipe(config_fn, sys.argv[1:], prog=Path(sys.argv[0]).name))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="diffrl", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    train_cmd = commands.add_parser("train", help="train with a recipe", add_help=False)
    train_cmd.add_argument("recipe")
    commands.add_parser("config", help="list every config key with its default and help")
    args, rest = parser.parse_known_args(argv)
    if args.command == "config":
        print(describe())
        return 0
    try:
        config_fn = load_recipe(args.recipe)
    except (FileNotFoundError, ConfigError) as error:
        print(f"diffrl train: {error}", file=sys.stderr)
        return 2
    return run_recipe(config_fn, rest, prog=f"diffrl train {args.recipe}")


if __name__ == "__main__":
    sys.exit(main())
