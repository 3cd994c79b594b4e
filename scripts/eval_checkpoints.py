"""A run's checkpoints against its base model on held-out prompts: the paired gain of every reward over training.

    python scripts/eval_checkpoints.py runs/draft_tiny [runs/other ...] [--rewards shapes,shapes_learned]
        [--epochs 10,20,30] [--grid docs/images/before_after.png]

Each run's base model (its config with the LoRA switched off) and its checkpoints sample the same prompts from the
same initial noise with the ODE (eta 0), so every image is scored before and after and each gain is a paired
difference, ± the standard error of the per-image differences. The rewards are scored separately, so a proxy
trained on (``shapes_learned``) and the verifier it imitates (``shapes``) are read on the same images: where the
first keeps rising and the second stops, the run is over-optimising. Rows also give the first reward's gain per
prompt kind of the embedded world (when the prompts are its). The last row pools the runs at each epoch they share:
per image, the mean over runs of the trained reward minus the base reward.

``--grid`` draws, for the first run's last checkpoint, two prompts of each kind (columns) from the same noises
before and after (rows). Writes ``<run>/eval_checkpoints.json`` per run.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffrl import policies
from diffrl.checkpoint import checkpoint_dirs
from diffrl.config import Config
from diffrl.evaluation import ODE, evaluate, paired_difference
from diffrl.grids import labelled_grid
from diffrl.loading import load_prompts
from diffrl.rewards import weighted_sum
from diffrl.tiny.world import parse


def kind_of(prompt: str) -> str | None:
    """The embedded world's prompt kind (single, count, binding, position), or None for any other prompt."""
    try:
        return parse(prompt).kind
    except ValueError:
        return None


def scores(policy, config: Config, prompts: list[str], rewards: list[str], args, seed: int, images=None) -> dict:
    """Per-image ODE score of each reward, from noise seeds ``seed + index``; ``images`` (a dict) gets the images."""
    result = evaluate(
        policy, prompts, weighted_sum(",".join(rewards)), samplers=(ODE,), num_steps=args.steps,
        guidance_scale=config.sample.guidance_scale if args.guidance is None else args.guidance,
        seed=seed, batch_size=args.batch_size, images_out=images,
    )  # fmt: skip
    return {name: result.scores[name]["ode"] for name in rewards}


def epoch_of(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix("epoch-"))


def grid(run: Path, config: Config, checkpoint: Path, prompts: list[str], args) -> None:
    """Two prompts of each kind, ``args.grid_noises`` noises, the base model's row above the trained one's."""
    by_kind = defaultdict(list)
    for prompt in prompts:
        by_kind[kind_of(prompt)].append(prompt)
    rng = random.Random(0)
    chosen = [p for kind in sorted(k for k in by_kind if k) for p in rng.sample(by_kind[kind], 2)]
    before, after = policies.load(config), policies.load(config)
    after.load_adapter(checkpoint)
    rows, tile_scores = [], []
    for n in range(args.grid_noises):
        for title, policy in (("base", before), (f"after {epoch_of(checkpoint)} epochs", after)):
            images: dict = {}
            scored = scores(policy, config, chosen, [args.rewards[0]], args, args.seed + 1000 * (n + 1), images)
            rows.append((f"{title}, noise {n + 1}", images["ode"]))
            tile_scores.append(scored[args.rewards[0]])
    array = labelled_grid(rows, chosen, tile_scores)
    args.grid.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(args.grid, optimize=True)
    print(f"grid of {run}'s {checkpoint.name} (tiles: {args.rewards[0]}): {args.grid}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="training output directories (with config.json)")
    parser.add_argument("--rewards", default="shapes", help="comma-separated reward names, each scored apart")
    parser.add_argument("--epochs", default="", help="comma-separated epochs (default: every checkpoint)")
    parser.add_argument("--prompts", default="tiny:heldout")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=None, help="default: each run's sample.guidance_scale")
    parser.add_argument("--seed", type=int, default=777)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--grid", type=Path, default=None)
    parser.add_argument("--grid-noises", type=int, default=2)
    args = parser.parse_args()
    args.rewards = [name.strip() for name in args.rewards.split(",") if name.strip()]
    wanted = {int(e) for e in args.epochs.split(",") if e.strip()}
    torch.set_grad_enabled(False)
    prompts = load_prompts(args.prompts)
    kinds = [kind_of(p) for p in prompts]
    kind_names = sorted({k for k in kinds if k})
    gains: dict[int, list[dict[str, torch.Tensor]]] = defaultdict(list)  # epoch -> per run, reward -> after - base
    header = " | ".join(f"{name} gain" for name in args.rewards)
    kind_header = "".join(f" | {args.rewards[0]} {kind}" for kind in kind_names)
    for run in args.runs:
        if not (run / "config.json").is_file():
            raise SystemExit(f"{run} has no config.json; pass a training output directory.")
        config = Config.load(run / "config.json")
        checkpoints = [c for c in checkpoint_dirs(run) if not wanted or epoch_of(c) in wanted]
        if not checkpoints:
            raise SystemExit(f"{run} has no checkpoint{' at epochs ' + args.epochs if wanted else ''}.")
        policy = policies.load(config)
        base = scores(policy, config, prompts, args.rewards, args, args.seed)
        base_means = ", ".join(f"{name} {base[name].mean():.3f}" for name in args.rewards)
        print(f"\n{run}: base {base_means} ({len(prompts)} prompts)")
        print(f"| epoch | {header}{kind_header} |\n|---|" + "---|" * (len(args.rewards) + len(kind_names)))
        record = {"base": {name: base[name].tolist() for name in args.rewards}, "epochs": {}}
        for checkpoint in checkpoints:
            policy.load_adapter(checkpoint)
            after = scores(policy, config, prompts, args.rewards, args, args.seed)
            epoch = epoch_of(checkpoint)
            gains[epoch].append({name: after[name] - base[name] for name in args.rewards})
            cells = [paired_difference(after[name], base[name]) for name in args.rewards]
            first = (after[args.rewards[0]] - base[args.rewards[0]]).tolist()
            per_kind = [np.mean([g for g, k in zip(first, kinds, strict=True) if k == kind]) for kind in kind_names]
            print(
                f"| {epoch} | " + " | ".join(f"{g:+.3f} ± {s:.3f}" for g, s in cells)
                + "".join(f" | {v:+.3f}" for v in per_kind) + " |",
                flush=True,
            )  # fmt: skip
            record["epochs"][epoch] = {name: after[name].tolist() for name in args.rewards}
        (run / "eval_checkpoints.json").write_text(
            json.dumps({"prompts": args.prompts, "steps": args.steps, "seed": args.seed, **record}) + "\n"
        )
    if len(args.runs) > 1:
        print(f"\n{len(args.runs)} runs pooled (per image, the mean over runs of after - base):")
        print(f"| epoch | {header} |\n|---|" + "---|" * len(args.rewards))
        for epoch in sorted(gains):
            if len(gains[epoch]) != len(args.runs):
                continue
            cells = []
            for name in args.rewards:
                mean = torch.stack([g[name] for g in gains[epoch]]).mean(0)
                cells.append(f"{mean.mean():+.3f} ± {mean.std() / len(mean) ** 0.5:.3f}")
            print(f"| {epoch} | " + " | ".join(cells) + " |")
    if args.grid is not None:
        run = args.runs[0]
        grid(run, Config.load(run / "config.json"), checkpoint_dirs(run)[-1], prompts, args)


if __name__ == "__main__":
    main()
