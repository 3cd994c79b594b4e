"""Does RL raise the held-out ODE reward of the embedded model? Base -> after, per seed, with wall-clock time.

    python scripts/bench_tiny_rl.py --recipe recipes/grpo_tiny.py --seeds 0,1,2 [--section.key value ...]

For each seed it trains the recipe (overrides apply), then evaluates the base model and the trained LoRA with
deterministic sampling (eta = 0) on the held-out prompts and on as many images of the recipe's training prompts
(a random subset of a large set; a small set repeated, each repeat from its own noise), from the same noise;
``--eval-repeats R`` samples every held-out prompt R times (and R times as many training-prompt images).
Every image is scored before and after from the same prompt and noise, so the gain is a paired difference and its
standard error is that of the per-image differences (far smaller than either mean's). The last row pools the
seeds: per image, the mean over seeds of the trained reward minus the base reward. ``--reuse`` evaluates a run
already trained to its last epoch with the same config under ``--out`` instead of training it again.
Prints a table and writes ``<out>/bench.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from diffrl import policies
from diffrl.checkpoint import config_differences, find_checkpoint, saved_config
from diffrl.config import apply_overrides
from diffrl.evaluation import ODE, evaluate, paired_difference
from diffrl.loading import load_prompts, load_recipe
from diffrl.rewards import weighted_sum
from diffrl.trainers import train


def ode_scores(config, adapter: Path | None, prompts: list[str], steps: int) -> torch.Tensor:
    """Per-image `shapes` reward of deterministic samples (seed ``4321 + index``), base model or a LoRA."""
    torch.manual_seed(0)
    policy = policies.load(config)
    if adapter is not None:
        policy.load_adapter(adapter)
    result = evaluate(
        policy, prompts, weighted_sum("shapes"), samplers=(ODE,), num_steps=steps,
        guidance_scale=config.sample.guidance_scale, seed=4321, batch_size=64,
    )  # fmt: skip
    return result.scores["shapes"]["ode"]


def mean_stderr(scores: torch.Tensor) -> list[float]:
    return [scores.mean().item(), scores.std().item() / len(scores) ** 0.5]


def evaluation_sample(prompts: list[str], size: int) -> list[str]:
    """``size`` of the recipe's training prompts: a random subset of a large set; a small set is repeated (each
    repeat is sampled from its own noise), so both evaluations score as many images."""
    if len(prompts) >= size:
        return random.Random(0).sample(prompts, size)
    return [prompts[i % len(prompts)] for i in range(size)]


def finished_run(run_dir: Path, config) -> Path | None:
    """The last-epoch checkpoint of an earlier run of exactly this config under ``run_dir``, if there is one."""
    try:
        checkpoint = find_checkpoint(run_dir, "latest")
    except FileNotFoundError:
        return None
    if int(checkpoint.name.removeprefix("epoch-")) != config.train.epochs:
        return None
    differences = [
        k for k in config_differences(saved_config(checkpoint), config.to_dict()) if not k.startswith("logging.")
    ]
    if differences:
        raise SystemExit(
            f"--reuse: {run_dir} was trained with a different config ({', '.join(differences)}); give the same "
            "recipe and overrides, or another --out."
        )
    return checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/grpo_tiny.py")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_tiny_rl"))
    parser.add_argument("--eval-steps", type=int, default=20)
    parser.add_argument("--reuse", action="store_true", help="evaluate runs already trained under --out")
    parser.add_argument(
        "--eval-repeats", type=int, default=1, help="images per held-out prompt, each from its own noise"
    )
    args, overrides = parser.parse_known_args()
    heldout = load_prompts("tiny:heldout") * args.eval_repeats
    sets = ("heldout", "train")
    base_config = apply_overrides(load_recipe(args.recipe)(), overrides)
    prompts = {"heldout": heldout, "train": evaluation_sample(load_prompts(base_config.prompts.train), len(heldout))}
    base_scores = {name: ode_scores(base_config, None, prompts[name], args.eval_steps) for name in sets}
    base = {name: mean_stderr(base_scores[name]) for name in sets}
    previous = {}  # wall-clock minutes of reused runs trained before bench_minutes.json, from their bench.json
    if args.reuse and (args.out / "bench.json").exists():
        previous = {row["seed"]: row for row in json.loads((args.out / "bench.json").read_text())["runs"]}
    rows, after_scores = [], []
    for seed in [int(s) for s in args.seeds.split(",")]:
        run_dir = args.out / f"{Path(args.recipe).stem}-seed{seed}"
        config = apply_overrides(
            base_config,
            ["--train.seed", str(seed), "--logging.output_dir", str(run_dir), "--logging.progress_bars", "false"],
        )
        checkpoint = finished_run(run_dir, config) if args.reuse else None
        if checkpoint is None:
            started = time.perf_counter()
            train(config)
            minutes = (time.perf_counter() - started) / 60
            checkpoint = find_checkpoint(run_dir, "latest")
            (run_dir / "bench_minutes.json").write_text(json.dumps({"minutes": minutes}) + "\n")
        elif (run_dir / "bench_minutes.json").exists():  # kept with the run: another --out's bench.json may be gone
            minutes = json.loads((run_dir / "bench_minutes.json").read_text())["minutes"]
        else:
            minutes = previous.get(seed, {}).get("minutes")
        scores = {name: ode_scores(config, checkpoint / "adapter", prompts[name], args.eval_steps) for name in sets}
        after_scores.append(scores)
        epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        timed = [row for row in epochs if "time/training_s" in row]
        per_epoch = {
            "sampling_s": sum(row["time/sampling_s"] for row in timed) / len(timed),
            "training_s": sum(row["time/training_s"] for row in timed) / len(timed),
        }
        row = {
            "seed": seed,
            "minutes": minutes,
            "after": {name: mean_stderr(scores[name]) for name in sets},
            "gain": {name: list(paired_difference(scores[name], base_scores[name])) for name in sets},
            "per_epoch": per_epoch,
        }
        rows.append(row)
        print(
            f"seed {seed}: held-out {base['heldout'][0]:.3f} -> {row['after']['heldout'][0]:.3f} "
            f"({row['gain']['heldout'][0]:+.3f} ± {row['gain']['heldout'][1]:.3f}), train {base['train'][0]:.3f} -> "
            f"{row['after']['train'][0]:.3f} ({row['gain']['train'][0]:+.3f} ± {row['gain']['train'][1]:.3f})",
            flush=True,
        )
    pooled = {
        name: list(paired_difference(torch.stack([s[name] for s in after_scores]).mean(0), base_scores[name]))
        for name in sets
    }

    def cell(values: list[float]) -> str:
        return f"{values[0]:.3f} ± {values[1]:.3f}"

    print(
        f"\n| {Path(args.recipe).stem} | held-out ODE | gain | train ODE | gain | minutes | sampling s/epoch | "
        "training s/epoch |\n|---|---|---|---|---|---|---|---|"
    )
    print(f"| base | {cell(base['heldout'])} | | {cell(base['train'])} | | | | |")
    for row in rows:
        h, t, e = row["after"], row["gain"], row["per_epoch"]
        minutes = "" if row["minutes"] is None else f"{row['minutes']:.1f}"
        print(
            f"| seed {row['seed']} | {cell(h['heldout'])} | {t['heldout'][0]:+.3f} ± {t['heldout'][1]:.3f} | "
            f"{cell(h['train'])} | {t['train'][0]:+.3f} ± {t['train'][1]:.3f} | {minutes} | "
            f"{e['sampling_s']:.1f} | {e['training_s']:.1f} |"
        )
    print(
        f"| seeds pooled | | {pooled['heldout'][0]:+.3f} ± {pooled['heldout'][1]:.3f} | | "
        f"{pooled['train'][0]:+.3f} ± {pooled['train'][1]:.3f} | | | |"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(
        json.dumps(
            {
                "recipe": args.recipe,
                "overrides": overrides,
                "base": base,
                "runs": rows,
                "pooled_gain": pooled,
                "scores": {
                    "base": {name: base_scores[name].tolist() for name in sets},
                    "after": [{name: s[name].tolist() for name in sets} for s in after_scores],
                },
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
