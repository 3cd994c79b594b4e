"""Train the learned shapes reward (``shapes_learned``): a small image-text scorer that predicts the verifier.

    python scripts/train_shapes_scorer.py [--steps 4000] [--out src/diffrl/tiny/scorer]

Its data, all scored by the ``shapes`` verifier against the prompt it is paired with:

- the world's scenes of training prompts, and scenes of perturbed captions (a colour, shape, count or relation
  changed, so partly right) paired with the original prompt, some with pixel noise or blur;
- the shipped tiny SD's own samples of training prompts (ODE and eta-1 SDE, 20 steps, guidance 2), so the scorer
  has seen the model's artefacts.

The fit is reported on held-out prompts (unseen combinations): the correlation with the verifier on scenes and
perturbations, and on the tiny SD's ODE samples. Fixed seed; writes ``model.safetensors``, ``config.json`` and
``fit.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from diffrl import policies
from diffrl.config import Config, ModelConfig, SampleConfig
from diffrl.evaluation import ODE, Sampler, evaluate
from diffrl.rewards import weighted_sum
from diffrl.rewards.shapes import shapes
from diffrl.rewards.shapes_learned import SHIPPED, ShapesScorer, tokenize
from diffrl.tiny.verifier_check import degrade
from diffrl.tiny.world import load_prompts, parse, perturb, render


def scenes(prompts: list[str], count: int, seed: int) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """``count`` scenes: a prompt's own (a third) or a perturbed caption's, some with noise or blur, scored."""
    rng = random.Random(seed)
    noise_rng = np.random.default_rng(seed)
    images, paired = [], []
    for i in range(count):
        prompt = rng.choice(prompts)
        caption = parse(prompt)
        drawn = caption if rng.random() < 1 / 3 else perturb(caption, rng.choice((0.25, 0.5, 1.0)), rng)
        image = render(drawn, seed=seed * 1_000_003 + i)
        roll = rng.random()
        if roll < 0.2:
            image = degrade(image, blur_radius=0.0, noise_std=12.75, rng=noise_rng)  # 0.05 of the range
        elif roll < 0.3:
            image = degrade(image, blur_radius=1.0, noise_std=0.0, rng=noise_rng)
        images.append(torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 255)
        paired.append(prompt)
    images = torch.stack(images)
    return images, paired, shapes(images, paired)


def model_samples(
    prompts: list[str], etas: tuple[float, ...], seed: int
) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """The shipped tiny SD's samples of ``prompts`` (20 steps, guidance 2) at each eta, scored."""
    config = Config(model=ModelConfig(family="sd", path="tiny"), sample=SampleConfig(guidance_scale=2.0))
    torch.manual_seed(0)
    policy = policies.load(config)
    samplers = [ODE if eta == 0 else Sampler.every_step(eta) for eta in etas]
    out: dict[str, torch.Tensor] = {}
    result = evaluate(policy, prompts, weighted_sum("shapes"), samplers=samplers, num_steps=20, guidance_scale=2.0,
                      seed=seed, batch_size=64, images_out=out)  # fmt: skip
    images = torch.cat([out[s.label] for s in samplers])
    scores = torch.cat([result.scores["shapes"][s.label] for s in samplers])
    return images, prompts * len(samplers), scores


def predict(model: ShapesScorer, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model.score(images[i : i + 256], prompts[i : i + 256]) for i in range(0, len(images), 256)])


def fit(model: ShapesScorer, images: torch.Tensor, prompts: list[str], truth: torch.Tensor) -> dict[str, float]:
    guess = predict(model, images, prompts)
    r = float(np.corrcoef(guess.numpy(), truth.numpy())[0, 1])
    return {"pearson": r, "mean_abs_error": float((guess - truth).abs().mean()), "images": len(images)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--report-every", type=int, default=500)
    parser.add_argument("--scenes", type=int, default=24000, help="scene examples of training prompts")
    parser.add_argument("--model-prompts", type=int, default=768, help="training prompts the tiny SD samples")
    parser.add_argument("--out", type=Path, default=SHIPPED)
    parser.add_argument("--data-cache", type=Path, default=None, help="keep the generated data here for re-runs")
    args = parser.parse_args()
    torch.manual_seed(0)
    started = time.perf_counter()
    train_prompts, heldout = load_prompts("train"), load_prompts("heldout")

    if args.data_cache is not None and args.data_cache.exists():
        scene_data, model_data, held_scenes, held_model = torch.load(args.data_cache)
    else:
        scene_data = scenes(train_prompts, args.scenes, seed=1)
        sampled_prompts = random.Random(2).choices(train_prompts, k=args.model_prompts)
        model_data = model_samples(sampled_prompts, (0.0, 1.0), seed=10_000)
        held_scenes = scenes(heldout, 2000, seed=3)
        held_model = model_samples(random.Random(4).choices(heldout, k=256), (0.0,), seed=20_000)
        if args.data_cache is not None:
            torch.save((scene_data, model_data, held_scenes, held_model), args.data_cache)
    print(f"data: {args.scenes} scenes, {len(model_data[0])} model samples ({time.perf_counter() - started:.0f} s)")

    images = torch.cat([scene_data[0], model_data[0]])
    prompts = scene_data[1] + model_data[1]
    targets = torch.cat([scene_data[2], model_data[2]])
    model = ShapesScorer()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    generator = torch.Generator().manual_seed(5)
    model_share = len(model_data[0]) / len(images)
    for step in range(args.steps):
        rows = torch.randint(0, len(images), (args.batch_size,), generator=generator)
        logits = model(images[rows], tokenize([prompts[i] for i in rows]))
        loss = F.binary_cross_entropy_with_logits(logits, targets[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % args.report_every == 0:
            model.eval()
            scenes_r, samples_r = fit(model, *held_scenes)["pearson"], fit(model, *held_model)["pearson"]
            print(f"step {step + 1}: loss {loss.item():.4f}, held-out r scenes {scenes_r:.3f} samples {samples_r:.3f}")
            model.train()
    model.eval()
    report = {
        "heldout_scenes": fit(model, *held_scenes),
        "heldout_model_samples": fit(model, *held_model),
        "train_model_samples": fit(model, *model_data),
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": args.steps,
        "model_sample_share": model_share,
        "minutes": (time.perf_counter() - started) / 60,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.out / "model.safetensors")
    (args.out / "config.json").write_text(json.dumps(model.config) + "\n")
    (args.out / "fit.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
