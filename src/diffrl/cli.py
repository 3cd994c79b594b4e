"""Command line.

    diffrl train RECIPE [--resume DIR|latest] [--section.key value ...]
    diffrl train --config run.yaml [--section.key value ...]      (or a run's config.json: the same run again)
    diffrl eval (--checkpoint DIR | --recipe RECIPE) [--sde-etas 1.0,1.5] [--steps 10,20,50] [--section.key value ...]
    diffrl sweep RECIPE --eta 0.5,1.0,1.2,2.0 --seeds 3 [--eval-steps 10,20] [--out DIR] [--section.key value ...]
    diffrl report RUN_OR_SWEEP_DIR
    diffrl serve-reward REWARD [--kwargs JSON] [--host 127.0.0.1] [--port 8000]
    diffrl config

A recipe is a Python file with a ``config() -> Config`` function (see ``recipes/``); every config field can be
overridden with a dotted key, e.g. ``diffrl train recipes/grpo_tiny.py --sample.eta 1.2 --train.seed 1``.
Recipes also run on their own: ``python recipes/grpo_tiny.py ...`` or ``accelerate launch recipes/grpo_tiny.py``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from diffrl import __version__
from diffrl.checkpoint import CorruptCheckpointError
from diffrl.config import CONFIG_SUFFIXES, Config, ConfigError, apply_overrides, describe
from diffrl.loading import call_config, load_recipe
from diffrl.rewards.combine import RewardError

# Errors that mean "change this input" (config, files, rewards, checkpoints, disk, non-finite values): the
# command prints the message without a traceback (DIFFRL_TRACEBACK=1 shows it) and exits with status 1.
USER_ERRORS = (ConfigError, RewardError, CorruptCheckpointError, FloatingPointError, OSError, ValueError)


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
        config = apply_overrides(call_config(config_fn, prog), overrides)
    except ConfigError as error:
        print(f"{prog}: config error: {error}", file=sys.stderr)
        return 2
    if args.print_config:
        import json

        print(json.dumps(config.to_dict(), indent=2, sort_keys=True))
        return 0
    try:
        train(config, resume=args.resume)
    except USER_ERRORS as error:
        if os.environ.get("DIFFRL_TRACEBACK"):
            raise
        print(f"{prog}: error: {error}\n(set DIFFRL_TRACEBACK=1 to see the traceback)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if os.environ.get("DIFFRL_TRACEBACK"):
            raise
        print(
            f"{prog}: interrupted; checkpoints in {config.logging.output_dir} are intact (a checkpoint is written "
            "whole or not at all). Continue with --resume latest.",
            file=sys.stderr,
        )
        return 130
    return 0


def recipe_main(config_fn: Callable[[], Config]) -> None:
    """Entry point of a recipe file run as a script (``python recipe.py`` or ``accelerate launch recipe.py``)."""
    sys.exit(run_recipe(config_fn, sys.argv[1:], prog=Path(sys.argv[0]).name))


def run_eval(argv: list[str]) -> int:
    """Evaluate a saved LoRA (or the base model of a recipe) at every step count: the ODE against the sampler that
    trained (its eta and SDE window), and every-step SDE at --sde-etas, all from the same noise."""
    parser = argparse.ArgumentParser(prog="diffrl eval", description=run_eval.__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a checkpoint folder, or a run folder (its latest checkpoint)")
    source.add_argument("--recipe", help="evaluate the recipe's base model (no LoRA)")
    parser.add_argument(
        "--sde-etas", default=None, help="comma-separated every-step SDE etas to add (default: eval.sde_etas)"
    )
    parser.add_argument("--steps", default=None, help="comma-separated step counts (default: eval.num_steps)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args, overrides = parser.parse_known_args(argv)
    try:
        return _evaluate(args, overrides)
    except (*USER_ERRORS, FileNotFoundError) as error:
        if os.environ.get("DIFFRL_TRACEBACK"):
            raise
        print(f"diffrl eval: error: {error}\n(set DIFFRL_TRACEBACK=1 to see the traceback)", file=sys.stderr)
        return 2


def _checkpoint_to_evaluate(path: str) -> Path:
    """A checkpoint folder (verified against its manifest), or a run folder's newest intact checkpoint."""
    from diffrl.checkpoint import find_checkpoint, verify_checkpoint

    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"--checkpoint {path!r} does not exist; give a checkpoint folder or a run folder.")
    if (directory / "manifest.json").is_file():
        verify_checkpoint(directory)
        return directory
    if not (directory / "checkpoints").is_dir():
        raise FileNotFoundError(f"--checkpoint {path!r} is neither a checkpoint folder nor a run folder with one.")
    return find_checkpoint(directory, "latest")


def _completed_epochs(checkpoint: Path) -> int:
    """The epochs a checkpoint folder ``epoch-XXXXXX`` was saved after (0 when its name does not say)."""
    name = checkpoint.name.removeprefix("epoch-")
    return int(name) if name.isdigit() else 0


def _evaluate(args: argparse.Namespace, overrides: list[str]) -> int:
    import json

    import torch

    from diffrl import policies
    from diffrl.evaluation import evaluate_with_config
    from diffrl.loading import load_eval_prompts
    from diffrl.rewards import weighted_sum
    from diffrl.rewards.registry import code_rewards

    if args.checkpoint:
        directory = _checkpoint_to_evaluate(args.checkpoint)
        config = apply_overrides(Config.load(directory / "config.json"), overrides)
        named = any(o.split("=")[0] in ("--reward", "--reward.spec") for o in overrides)
        code = code_rewards(config.reward.spec)
        if code and not named:
            raise ConfigError(
                f"the checkpoint's config names reward code to run ({', '.join(code)}); a checkpoint from elsewhere "
                f"should not run code it names. To run it, name it yourself: --reward '{config.reward.spec}' (or "
                "evaluate with another reward)."
            )
    else:
        directory = None
        config = apply_overrides(load_recipe(args.recipe)(), overrides)
    sde_etas = None if args.sde_etas is None else [float(e) for e in args.sde_etas.split(",") if e.strip()]
    completed = 0 if directory is None else _completed_epochs(directory)
    steps = [int(n) for n in args.steps.split(",")] if args.steps else [config.eval.num_steps]
    torch.manual_seed(config.train.seed)
    policy = policies.load(config)
    if directory is not None:
        policy.load_adapter(directory / "adapter")
    prompts = load_eval_prompts(config)
    reward = weighted_sum(config.reward.spec, kwargs=config.reward.kwargs)
    results = {}
    print(f"{len(prompts)} prompts from {config.prompts.eval}; reward {config.reward.spec}")
    for num_steps in steps:
        result = evaluate_with_config(
            policy, config, prompts, reward, completed_epochs=completed, sde_etas=sde_etas, num_steps=num_steps
        )
        metrics = result.to_metrics()
        results[num_steps] = metrics
        print(f"steps={num_steps}: " + "; ".join(f"{s.label} = {s.describe(num_steps)}" for s in result.samplers))
        for name in result.scores:
            cells = "  ".join(f"{lbl}: {result.mean(name, lbl):.4f} ± {result.stderr(name, lbl):.4f}" for lbl in
                              result.labels)  # fmt: skip
            gap = metrics.get(f"eval/{name}/gap")
            gap_text = "" if gap is None else f"  gap (ode - train_sampler): {gap:+.4f}"
            print(f"  {name}: {cells}{gap_text}")
    if args.out:
        Path(args.out).write_text(json.dumps({str(k): v for k, v in results.items()}, indent=1, sort_keys=True))
    return 0


def parse_seeds(text: str) -> list[int]:
    """``--seeds``: a count N (seeds 0..N-1) or a comma-separated list (``0,`` is seed 0 alone)."""
    if "," in text:
        seeds = [int(part) for part in text.split(",") if part.strip()]
        if not seeds:
            raise ValueError(f"--seeds {text!r} names no seed; pass a count (3) or a list (0,2).")
        return seeds
    count = int(text)
    if count < 1:
        raise ValueError(
            f"--seeds {text} is a count of seeds and trains nothing; "
            f"for seed {text} alone pass a list: --seeds {text},"
        )
    return list(range(count))


def run_sweep_command(argv: list[str]) -> int:
    """Train one run per (training eta, seed) from a recipe, evaluate each ODE vs SDE, and tabulate over seeds."""
    from diffrl.sweep import markdown_table, run_sweep

    parser = argparse.ArgumentParser(prog="diffrl sweep", description=run_sweep_command.__doc__)
    parser.add_argument("recipe")
    parser.add_argument("--eta", required=True, help="comma-separated training etas, e.g. 0.5,1.0,1.2,2.0")
    parser.add_argument(
        "--seeds", default="3", help="a count N (seeds 0..N-1) or a comma-separated list (0, is seed 0 alone)"
    )
    parser.add_argument("--eval-steps", default=None, help="comma-separated step counts (default: eval.num_steps)")
    parser.add_argument("--out", default=None, help="sweep folder (default: runs/sweep-<recipe name>)")
    args, overrides = parser.parse_known_args(argv)
    try:
        etas = [float(e) for e in args.eta.split(",")]
        seeds = parse_seeds(args.seeds)
        steps = [int(n) for n in args.eval_steps.split(",")] if args.eval_steps else None
        out = Path(args.out or f"runs/sweep-{Path(args.recipe).stem}")
        rows = run_sweep(args.recipe, etas, seeds, out, overrides, steps)
    except (FileNotFoundError, ConfigError, ValueError) as error:
        print(f"diffrl sweep: {error}", file=sys.stderr)
        return 2
    print(markdown_table(rows))
    print(f"written: {out / 'sweep.csv'}, {out / 'sweep.md'}; plots: diffrl report {out}")
    return 0


def run_config(argv: list[str]) -> int:
    """``diffrl config``: every key with its default; ``diffrl config RECIPE_OR_CONFIG [--section.key value ...]``:
    the values that recipe or file trains with (and the defaults it changes); ``--json`` / ``--yaml`` print them as
    a config file for ``diffrl train --config``."""
    parser = argparse.ArgumentParser(prog="diffrl config", description=run_config.__doc__)
    parser.add_argument("source", nargs="?", default=None, help="a recipe (.py) or a config file (.json, .yaml)")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print the config as JSON (a config file)")
    output.add_argument("--yaml", action="store_true", help="print the config as YAML (a config file)")
    args, overrides = parser.parse_known_args(argv)
    try:
        if args.source is None:
            config = apply_overrides(Config(), overrides) if overrides else None
        elif args.source.endswith(CONFIG_SUFFIXES):
            config = apply_overrides(Config.load(args.source), overrides)
        else:
            config = apply_overrides(load_recipe(args.source)(), overrides)
    except (*USER_ERRORS, FileNotFoundError) as error:
        print(f"diffrl config: {error}", file=sys.stderr)
        return 2
    if args.json or args.yaml:
        data = json.loads(json.dumps((config or Config()).to_dict()))  # tuples as lists, for YAML too
        if args.yaml:
            import yaml

            print(yaml.safe_dump(data, sort_keys=True), end="")
        else:
            print(json.dumps(data, indent=2, sort_keys=True))
        return 0
    print(describe(config))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="diffrl", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("train", help="train with a recipe or a config file (JSON, YAML)", add_help=False)
    commands.add_parser(
        "config", help="every config key with its default and help, or a recipe's values (--json, --yaml)",
        add_help=False,
    )  # fmt: skip
    commands.add_parser("eval", help="evaluate a checkpoint or a base model: ODE vs SDE", add_help=False)
    commands.add_parser("serve-reward", help="serve one reward over HTTP for training elsewhere", add_help=False)
    commands.add_parser("sweep", help="train and evaluate one run per (eta, seed); a table over seeds", add_help=False)
    commands.add_parser("report", help="a markdown page with plots and image grids of a run or sweep", add_help=False)
    parser.add_argument("--version", action="version", version=f"diffrl {__version__}")
    args, rest = parser.parse_known_args(argv)
    if args.command == "sweep":
        return run_sweep_command(rest)
    if args.command == "report":
        from diffrl.report import main as report_main

        return report_main(rest)
    if args.command == "serve-reward":
        from diffrl.rewards.server import main as serve_main

        return serve_main(rest)
    if args.command == "config":
        return run_config(rest)
    if args.command == "eval":
        return run_eval(rest)
    recipe = rest.pop(0) if rest and not rest[0].startswith("-") else None
    config_file = None
    if "--config" in rest:
        i = rest.index("--config")
        config_file = rest[i + 1] if i + 1 < len(rest) else ""
        del rest[i : i + 2]
    if config_file is not None and recipe is not None:
        print("diffrl train: give a recipe or --config FILE, not both.", file=sys.stderr)
        return 2
    source = config_file or recipe
    if source is None:  # `diffrl train --help`, or nothing given: the keys and how to start
        _train_parser("diffrl train RECIPE_OR_CONFIG").print_help()
        return 0 if "-h" in rest or "--help" in rest else 2
    prog = f"diffrl train {source}"
    if source.endswith(CONFIG_SUFFIXES):  # read (and its errors reported) by run_recipe, once
        return run_recipe(functools.partial(Config.load, source), rest, prog=prog)
    try:
        config_fn = load_recipe(source)
    except (FileNotFoundError, ConfigError) as error:
        print(f"diffrl train: {error}", file=sys.stderr)
        return 2
    return run_recipe(config_fn, rest, prog=prog)


if __name__ == "__main__":
    sys.exit(main())
