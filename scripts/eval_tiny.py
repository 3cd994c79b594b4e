"""Measure a tiny model: held-out and training `shapes` reward per prompt kind, a sample grid, speed.

    python scripts/eval_tiny.py [--family sd|flux] [--model DIR] [--steps 20,50] [--guidance 2.0] [--grid PNG]

Sampling is deterministic (DDIM or the flow ODE, eta = 0) with classifier-free guidance, through plain
``diffusers.StableDiffusionPipeline`` / ``FluxPipeline`` (true CFG against the empty prompt): the same path SD1.5
and FLUX.1 checkpoints take.
"""

from __future__ import annotations

import argparse
import random
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from diffusers import FluxPipeline, StableDiffusionPipeline
from PIL import Image

from diffrl.rewards.shapes import shapes
from diffrl.tiny import tiny_model_path
from diffrl.tiny.world import all_captions, load_prompts, parse


def sample(pipeline, prompts: list[str], seeds: list[int], steps: int, guidance: float) -> torch.Tensor:
    images = []
    for i in range(0, len(prompts), 64):
        generators = [torch.Generator().manual_seed(s) for s in seeds[i : i + 64]]
        if isinstance(pipeline, FluxPipeline):
            size = pipeline.vae.config.sample_size
            guide = {"true_cfg_scale": guidance, "negative_prompt": "", "height": size, "width": size}
            guide["max_sequence_length"] = pipeline.tokenizer_2.model_max_length
        else:
            guide = {"guidance_scale": guidance, "eta": 0.0}
        out = pipeline(prompts[i : i + 64], num_inference_steps=steps, generator=generators, output_type="pt", **guide)
        images.append(out.images)
    return torch.cat(images)


def report(name: str, prompts: list[str], rewards: torch.Tensor) -> float:
    by_kind = defaultdict(list)
    for prompt, reward in zip(prompts, rewards.tolist(), strict=True):
        by_kind[parse(prompt).kind].append(reward)
    cells = " | ".join(f"{k} {np.mean(v):.3f}" for k, v in sorted(by_kind.items()))
    print(f"  {name:9s} mean {rewards.mean():.3f} (n={len(prompts)}) | {cells}")
    return rewards.mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=("sd", "flux"), default="sd")
    parser.add_argument("--model", type=Path, default=None, help="model directory (default: the shipped one)")
    parser.add_argument("--steps", default="20,50")
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--seeds-per-prompt", type=int, default=2)
    parser.add_argument("--grid", type=Path, default=Path("runs/tiny_grid.png"))
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    pipeline_class = FluxPipeline if args.family == "flux" else StableDiffusionPipeline
    pipeline = pipeline_class.from_pretrained(args.model or tiny_model_path(args.family))
    pipeline.set_progress_bar_config(disable=True)

    heldout = load_prompts("heldout")
    train = random.Random(0).sample(load_prompts("train"), len(heldout))
    singles = [c.text for c in all_captions() if c.kind == "single"]  # all 15, which the train sample barely holds
    for steps in [int(s) for s in args.steps.split(",")]:
        print(f"{args.family} ODE (eta=0), {steps} steps, CFG {args.guidance}:")
        for name, prompts, repeats in [
            ("held-out", heldout, args.seeds_per_prompt),
            ("train", train, args.seeds_per_prompt),
            ("singles", singles, 8 * args.seeds_per_prompt),
        ]:
            repeated = [p for p in prompts for _ in range(repeats)]
            seeds = list(range(len(repeated)))
            report(name, repeated, shapes(sample(pipeline, repeated, seeds, steps, args.guidance), repeated))

    sample(pipeline, ["a red circle"] * 16, list(range(16)), 20, args.guidance)  # warm-up
    started = time.perf_counter()
    sample(pipeline, ["a red circle"] * 16, list(range(16)), 20, args.guidance)
    print(f"16 images, 20 steps, CFG: {time.perf_counter() - started:.2f} s")

    grid_prompts = [
        "a red circle", "a blue square", "a yellow triangle", "two green circles",
        "three purple squares", "a red circle and a blue square", "a green square left of a yellow circle",
        "a blue triangle above a red square",
    ]  # fmt: skip
    rows = [sample(pipeline, [p] * 8, list(range(100, 108)), 20, args.guidance) for p in grid_prompts]
    grid = torch.cat([torch.cat(list(row), dim=2) for row in rows], dim=1)  # [3, 8*64, 8*64]
    args.grid.parent.mkdir(parents=True, exist_ok=True)
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(array).resize((1024, 1024), Image.Resampling.NEAREST).save(args.grid)
    print(f"grid of {len(grid_prompts)} prompts x 8 seeds (one prompt a row): {args.grid}")
    for i, p in enumerate(grid_prompts):
        print(f"  row {i + 1}: {p}")


if __name__ == "__main__":
    main()
