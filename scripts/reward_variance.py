"""Where does a recipe's reward variance come from? Choose the SDE window with it.

    python scripts/reward_variance.py --recipe recipes/grpo_tiny.py --windows 0-1,0-4,0-8,4-20,all [--prompts 32]

Every prompt is sampled from ``--initial-noises`` initial noises times ``--step-noises`` step noises with only the
window's steps stochastic (at the recipe's eta), and the reward's variance is split into the part the window's
step noise explains (same prompt, same initial noise) and the whole variance within a prompt. GRPO computes
advantages within a prompt's group and credits them to the trained steps: a window whose steps explain most of
the within-prompt variance is one whose steps decide the reward, and the fewer steps it takes to get there, the
less of the gradient is noise from steps that do not matter. The leverage column is how far the policy can move
those steps' means, in units of their noise, per unit of model output (their mean): a window whose noise decides
the reward but whose leverage is small (a flow model's first steps) gives the policy almost nothing to re-weight.
Uses the recipe's model, reward, prompts, guidance, step count and noise schedule; ``--section.key value``
overrides apply as in ``diffrl train``, and ``--model.init_weights`` measures a trained LoRA instead of the base.
"""

from __future__ import annotations

import argparse
import math
import random
import time

import torch

from diffrl import policies
from diffrl.config import apply_overrides
from diffrl.evaluation import noise_variance, step_leverage
from diffrl.loading import load_prompts, load_recipe
from diffrl.rewards import weighted_sum
from diffrl.sampling.rollout import sde_window_mask


def parse_windows(text: str) -> list[tuple[int, int] | None]:
    windows = []
    for part in text.split(","):
        if part == "all":
            windows.append(None)
            continue
        start, _, end = part.partition("-")
        windows.append((int(start), int(end)))
    return windows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/grpo_tiny.py")
    parser.add_argument("--windows", default="0-1,0-4,0-8,4-20,all", help="start-end pairs (end exclusive) or 'all'")
    parser.add_argument("--prompts", type=int, default=32, help="training prompts used (a random subset)")
    parser.add_argument("--initial-noises", type=int, default=2)
    parser.add_argument("--step-noises", type=int, default=4)
    args, overrides = parser.parse_known_args()
    config = apply_overrides(load_recipe(args.recipe)(), overrides)
    torch.manual_seed(0)
    policy = policies.load(config)
    if config.model.init_weights:  # a trained LoRA (--model.init_weights RUN/checkpoints/epoch-N): after training
        policy.load_adapter(config.model.init_weights)
    prompts = load_prompts(config.prompts.train)
    if len(prompts) > args.prompts:
        prompts = random.Random(0).sample(prompts, args.prompts)
    started = time.perf_counter()
    rows = noise_variance(
        policy, prompts, weighted_sum(config.reward.spec, kwargs=config.reward.kwargs), parse_windows(args.windows),
        eta=config.sample.eta, num_steps=config.sample.num_steps, guidance_scale=config.sample.guidance_scale,
        noise_schedule=config.sample.noise_schedule, initial_noises=args.initial_noises,
        step_noises=args.step_noises, batch_size=config.sample.batch_size,
    )  # fmt: skip
    print(
        f"{len(prompts)} prompts x {args.initial_noises} initial noises x {args.step_noises} step noises, "
        f"eta {config.sample.eta}, {config.sample.num_steps} steps, {(time.perf_counter() - started) / 60:.1f} min\n"
    )
    leverage = step_leverage(
        policy, config.sample.num_steps, eta=config.sample.eta, noise_schedule=config.sample.noise_schedule
    )
    print(
        "| SDE window | mean reward | variance from the window's steps | variance within a prompt | share | leverage |"
    )
    print("|---|---|---|---|---|---|")
    for row in rows:
        in_window = sde_window_mask(config.sample.num_steps, row.sde_window).tolist()
        # the mean over the window's stochastic steps; a window with none (eta 0) has nothing to train
        finite = [v for v, inside in zip(leverage, in_window, strict=True) if inside and math.isfinite(v)]
        window = "all" if row.sde_window is None else f"{row.sde_window[0]}-{row.sde_window[1]}"
        print(
            f"| {window} | {row.mean:.3f} | {row.step_var:.4f} | {row.prompt_var:.4f} | {row.step_share:.2f} "
            f"| {sum(finite) / len(finite) if finite else math.inf:.2f} |"
        )


if __name__ == "__main__":
    main()
