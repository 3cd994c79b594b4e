"""Measure a tiny model's headroom: what it draws for a prompt, what re-weighting its samples could reach, and the
autoencoder's ceiling, per prompt kind.

    python scripts/eval_tiny.py [--family sd|flux] [--model DIR] [--steps 20] [--guidance 1.0] [--best-of 16]
        [--prompts heldout|train] [--grid runs/tiny_grid.png]

For each prompt it draws ``--best-of`` samples from different initial noise with the ODE sampler (DDIM or the flow
Euler step, eta = 0) through plain ``diffusers.StableDiffusionPipeline`` / ``FluxPipeline`` (true CFG against the
empty prompt), and scores them with the ``shapes`` verifier:

- **mean**: the mean reward of all samples (the base model's ODE reward);
- **best-of-N**: per prompt the best of its N samples, averaged over prompts (what re-weighting the model's own
  samples can reach);
- **ceiling**: ground-truth scenes of the same prompts, rendered by the world, encoded and decoded by the model's VAE;
- **the data's own adherence** (``--data``, a pretraining work directory): per prompt, up to 16 pretraining scenes
  whose loose caption is exactly the prompt, scored against it: what a model that fits its pretraining data
  exactly would score without guidance. Below it the model under-fits its data (a skill it lacks); at it, what is
  left is the captions' looseness (a choice RL can re-weight);
- **constraints missed**: per kind of constraint (an object of a named colour present, its count, its shape, the
  relation, nothing of another colour), the share of the samples' constraints of that kind that fail: what the
  model gets wrong, and so what a trainer has to change.

It also saves a grid: rows of conditional samples and a row of unconditional ones (the empty prompt), to look at.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from diffusers import FluxPipeline, StableDiffusionPipeline
from PIL import Image
from safetensors import safe_open

from diffrl.rewards.shapes import shapes, verify
from diffrl.tiny import tiny_model_path
from diffrl.tiny.world import load_prompts, parse, render


def sample(pipeline, prompts: list[str], seeds: list[int], steps: int, guidance: float) -> torch.Tensor:
    """ODE samples ``[N, 3, H, W]`` in [0, 1], one generator per image."""
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


def through_vae(pipeline, prompts: list[str]) -> torch.Tensor:
    """Ground-truth scenes of ``prompts`` after the model's VAE encode/decode, ``[N, 3, 64, 64]`` in [0, 1]."""
    scenes = np.stack([render(p, seed=i) for i, p in enumerate(prompts)])
    x = torch.from_numpy(scenes).permute(0, 3, 1, 2).float() / 127.5 - 1
    vae = pipeline.vae
    decoded = torch.cat([vae.decode(vae.encode(x[i : i + 64]).latent_dist.mean).sample for i in range(0, len(x), 64)])
    return ((decoded + 1) / 2).clamp(0, 1)


def data_adherence(work: Path, prompts: list[str], per_prompt: int = 16, seed: int = 0) -> dict[str, float]:
    """For each prompt that is a loose caption in the pretraining data set in ``work`` (of ``pretrain_tiny.py``), the
    verifier's mean score of up to ``per_prompt`` of the scenes captioned with it."""
    captions = work / "captions.json"
    if not captions.exists():
        raise SystemExit(f"{work} holds no pretraining data set (captions.json); pass the --work of pretrain_tiny.py.")
    indices = defaultdict(list)
    for i, text in enumerate(json.loads(captions.read_text())["texts"]):
        indices[text].append(i)
    rng, scores = random.Random(seed), {}
    with safe_open(str(work / "scenes.safetensors"), "pt") as f:
        scenes = f.get_slice("images")
        for prompt in prompts:
            if indices[prompt]:
                chosen = rng.sample(indices[prompt], min(per_prompt, len(indices[prompt])))
                caption = parse(prompt)
                scores[prompt] = float(np.mean([verify(scenes[i : i + 1][0].numpy(), caption).score for i in chosen]))
    return scores


def by_kind(prompts: list[str], values: list[float]) -> dict[str, float]:
    groups = defaultdict(list)
    for prompt, value in zip(prompts, values, strict=True):
        groups[parse(prompt).kind].append(value)
    return {kind: float(np.mean(v)) for kind, v in sorted(groups.items())}


def row(name: str, prompts: list[str], values: list[float]) -> str:
    cells = " | ".join(f"{v:.3f}" for v in by_kind(prompts, values).values())
    return f"| {name} | {np.mean(values):.3f} ± {np.std(values) / np.sqrt(len(values)):.3f} | {cells} |"


def missed_by_kind(images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
    missed, total = defaultdict(int), defaultdict(int)
    array = images.clamp(0, 1).permute(0, 2, 3, 1).numpy()
    for image, prompt in zip(array, prompts, strict=True):
        verdict = verify(image, parse(prompt))
        for kind, (_, ok) in zip(verdict.kinds, verdict.constraints, strict=True):
            total[kind] += 1
            missed[kind] += not ok
    return {kind: missed[kind] / total[kind] for kind in total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=("sd", "flux"), default="sd")
    parser.add_argument("--model", type=Path, default=None, help="model directory (default: the shipped one)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance (1: none)")
    parser.add_argument("--best-of", type=int, default=16, help="samples per prompt from different noise")
    parser.add_argument("--prompts", default="heldout", choices=("heldout", "train"))
    parser.add_argument("--max-prompts", type=int, default=0, help="the first N prompts only (0: all)")
    parser.add_argument("--grid", type=Path, default=Path("runs/tiny_grid.png"))
    parser.add_argument("--data", type=Path, default=None, help="a pretraining --work directory: its own adherence")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    pipeline_class = FluxPipeline if args.family == "flux" else StableDiffusionPipeline
    pipeline = pipeline_class.from_pretrained(args.model or tiny_model_path(args.family))
    pipeline.set_progress_bar_config(disable=True)

    prompts = load_prompts(args.prompts)
    if args.max_prompts:
        prompts = prompts[: args.max_prompts]
    n = args.best_of
    repeated = [p for p in prompts for _ in range(n)]
    started = time.perf_counter()
    images = sample(pipeline, repeated, list(range(len(repeated))), args.steps, args.guidance)
    rewards = shapes(images, repeated)
    seconds = time.perf_counter() - started
    per_prompt = rewards.view(len(prompts), n)
    ceiling = shapes(through_vae(pipeline, prompts), prompts)

    kinds = list(by_kind(prompts, [0.0] * len(prompts)))
    print(f"{args.family}, {len(prompts)} {args.prompts} prompts, ODE {args.steps} steps, CFG {args.guidance:g}, "
          f"{n} samples a prompt ({len(repeated)} images in {seconds:.0f} s):")  # fmt: skip
    print(f"| | all | {' | '.join(kinds)} |")
    print("|---|---|" + "---|" * len(kinds))
    print(row("mean (ODE)", prompts, per_prompt.mean(dim=1).tolist()))
    print(row(f"best of {n}", prompts, per_prompt.max(dim=1).values.tolist()))
    print(row("ground truth through the VAE", prompts, ceiling.tolist()))
    if args.data:
        adherence = data_adherence(args.data, prompts)
        if adherence:
            print(row("the pretraining data's own adherence", list(adherence), list(adherence.values())))
        print(f"({len(adherence)} of {len(prompts)} prompts are pretraining captions)")
    print(f"share of samples with every constraint met: {(rewards == 1).float().mean():.3f}")
    missed = missed_by_kind(images, repeated)
    print("constraints missed, by kind: " + ", ".join(f"{kind} {share:.2f}" for kind, share in missed.items()))

    grid_prompts = [
        "a red circle", "a blue square", "a yellow triangle", "two green circles",
        "three purple squares", "a red circle and a blue square", "a green square left of a yellow circle",
        "a blue triangle above a red square", "",
    ]  # fmt: skip
    rows = [sample(pipeline, [p] * 8, list(range(100, 108)), args.steps, args.guidance) for p in grid_prompts]
    grid = torch.cat([torch.cat(list(r), dim=2) for r in rows], dim=1)
    args.grid.parent.mkdir(parents=True, exist_ok=True)
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(array).resize((array.shape[1] * 2, array.shape[0] * 2), Image.Resampling.NEAREST).save(args.grid)
    print(f"grid, one prompt a row (the last row unconditional): {args.grid}")
    for i, p in enumerate(grid_prompts):
        print(f"  row {i + 1}: {p or '(empty prompt)'}")


if __name__ == "__main__":
    main()
