"""Does RL raise the held-out ODE reward of the embedded model? Base -> after, per seed, with wall-clock time.

    python scripts/bench_tiny_rl.py --recipe recipes/grpo_tiny.py --seeds 0,1,2 [--section.key value ...]

For each seed it trains the recipe (overrides apply), then evaluates the base model and the trained LoRA with
deterministic sampling (eta = 0) on the held-out prompts and on as many images of the recipe's training prompts
(a random subset of a large set; a small set repeated, each repeat from its own noise), from the same noise.
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
from diffrl.checkpoint import find_checkpoint
from diffrl.cli import load_recipe
from diffrl.config import apply_overrides
from diffrl.evaluation import evaluate
from diffrl.rewards import weighted_sum
from diffrl.trainers import train
from diffrl.trainers.base import load_prompts


def ode_reward(config, adapter: Path | None, prompts: list[str], steps: int) -> tuple[float, float]:
    torch.manual_seed(0)
    policy = policies.load(config)
    if adapter is not None:
        policy.load_adapter(adapter)
    result = evaluate(
        policy, prompts, weighted_sum("shapes"), etas=(0.0,), num_steps=steps,
        guidance_scale=config.sample.guidance_scale, seed=4321, batch_size=64,
    )  # fmt: skip
    return result.mean("shapes", 0.0), result.stderr("shapes", 0.0)


def evaluation_sample(prompts: list[str], size: int) -> list[str]:
    """``size`` of the recipe's training prompts: a random subset of a large set; a small set is repeated (each
    repeat is sampled from its own noise), so both evaluations score as many images."""
    if len(prompts) >= size:
        return random.Random(0).sample(prompts, size)
    return [prompts[i % len(prompts)] for i in range(size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/grpo_tiny.py")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_tiny_rl"))
    parser.add_argument("--eval-steps", type=int, default=20)
    args, overrides = parser.parse_known_args()
    heldout = load_prompts("tiny:heldout")
    rows = []
    base_config = apply_overrides(load_recipe(args.recipe)(), overrides)
    train_prompts = evaluation_sample(load_prompts(base_config.prompts.train), len(heldout))
    base = {
        "heldout": ode_reward(base_config, None, heldout, args.eval_steps),
        "train": ode_reward(base_config, None, train_prompts, args.eval_steps),
    }
    for seed in [int(s) for s in args.seeds.split(",")]:
        run_dir = args.out / f"{Path(args.recipe).stem}-seed{seed}"
        config = apply_overrides(
            base_config,
            ["--train.seed", str(seed), "--logging.output_dir", str(run_dir), "--logging.progress_bars", "false"],
        )
        started = time.perf_counter()
        train(config)
        minutes = (time.perf_counter() - started) / 60
        adapter = find_checkpoint(run_dir, "latest") / "adapter"
        after = {
            "heldout": ode_reward(config, adapter, heldout, args.eval_steps),
            "train": ode_reward(config, adapter, train_prompts, args.eval_steps),
        }
        epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        timed = [row for row in epochs if "time/training_s" in row]
        per_epoch = {
            "sampling_s": sum(row["time/sampling_s"] for row in timed) / len(timed),
            "training_s": sum(row["time/training_s"] for row in timed) / len(timed),
        }
        rows.append({"seed": seed, "minutes": minutes, "after": after, "per_epoch": per_epoch})
        print(
            f"seed {seed}: held-out {base['heldout'][0]:.3f} -> {after['heldout'][0]:.3f}, "
            f"train {base['train'][0]:.3f} -> {after['train'][0]:.3f}, {minutes:.1f} min",
            flush=True,
        )
    print(
        f"\n| {Path(args.recipe).stem} | held-out ODE | train ODE | minutes | sampling s/epoch | training s/epoch |"
        "\n|---|---|---|---|---|---|"
    )
    print(f"| base | {base['heldout'][0]:.3f} ± {base['heldout'][1]:.3f} | {base['train'][0]:.3f} ± "
          f"{base['train'][1]:.3f} | | | |")  # fmt: skip
    for row in rows:
        h, t = row["after"]["heldout"], row["after"]["train"]
        e = row["per_epoch"]
        print(
            f"| seed {row['seed']} | {h[0]:.3f} ± {h[1]:.3f} | {t[0]:.3f} ± {t[1]:.3f} | {row['minutes']:.1f} | "
            f"{e['sampling_s']:.1f} | {e['training_s']:.1f} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps({"recipe": args.recipe, "base": base, "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
