"""What can the trained weights learn with no RL? Supervised denoising on the world's own ground-truth scenes.

    python scripts/lora_capacity.py [--model DIR] [--prompt "a blue triangle and a red circle"]
        [--targets attention,blocks,full] [--steps 300] [--eval-every 50]
    python scripts/lora_capacity.py --prompts recipes/prompts/shapes_train32.txt [--scenes 1024] --targets blocks
        [--steps 800] [--eval-every 400]      # held-out mode

For each set of trained weights it fits the model (``--model``, default the embedded tiny SD) to ground-truth scenes
(the world's renders, encoded by the model's VAE) with the ordinary denoising loss (the model's own target, epsilon
or v; uniform timesteps, AdamW, 16 scenes a step). The targets:

- ``attention``: LoRA rank 8 on the attention projections (the LoRA default, lr 1e-3);
- ``blocks``: LoRA rank 16 on ``diffrl.config.UNET_BLOCKS`` (attention, feed-forward, transformer projections and
  ResNet convolutions; lr 1e-3);
- ``full``: every UNet weight (lr 3e-4).

One prompt (``--prompt``, 512 scenes): every ``--eval-every`` steps 64 ODE samples of the prompt (20 steps, guidance
2, the same noise each time) are scored with the ``shapes`` verifier. A trainer cannot make a model draw what these
weights cannot learn from the answer itself: where supervised fitting stalls, RL on the same weights stalls too.

A prompt list (``--prompts``, ``--scenes`` in all, spread evenly over the prompts): every ``--eval-every`` steps the
held-out prompts (``--heldout``, default all 189 of ``tiny:heldout``) are sampled once each with the ODE from the
same noise as the base model's, and the paired gain is printed: how far the answer itself, given for these training
prompts, carries to prompts never trained on, the reference for an RL recipe's held-out gain.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from diffrl import policies
from diffrl.config import UNET_BLOCKS, Config, apply_overrides
from diffrl.evaluation import ODE, evaluate, paired_difference
from diffrl.loading import load_prompts
from diffrl.rewards import weighted_sum
from diffrl.rewards.shapes import shapes
from diffrl.sampling.rollout import rollout
from diffrl.tiny.world import render

TARGETS = {
    "attention": (["--lora.rank", "8", "--lora.alpha", "8"], 1e-3),
    "blocks": (["--lora.rank", "16", "--lora.alpha", "16", "--lora.target_modules", ",".join(UNET_BLOCKS)], 1e-3),
    "full": (["--lora.rank", "8", "--lora.alpha", "8"], 3e-4),
}


def single_prompt_score(prompt: str):
    """The score of one prompt: 64 ODE samples from fixed noise, the verifier's mean."""

    def score(policy) -> str:
        with torch.no_grad():
            out = rollout(policy, [prompt] * 64, list(range(1000, 1064)), eta=0.0, num_steps=20, guidance_scale=2.0)
        return f"{shapes(out.images, [prompt] * 64).mean().item():.3f}"

    return score


def heldout_score(heldout: list[str]):
    """The paired held-out gain: every held-out prompt once, ODE, from the same noise as the base model's."""
    reward, base = weighted_sum("shapes"), []

    def score(policy) -> str:
        with torch.no_grad():
            result = evaluate(
                policy, heldout, reward, samplers=(ODE,), num_steps=20, guidance_scale=2.0, seed=777, batch_size=64
            )
        scores = result.scores["shapes"]["ode"]
        if not base:
            base.append(scores)
            return f"{scores.mean():.3f}"
        gain, error = paired_difference(scores, base[0])
        return f"{gain:+.3f} ± {error:.3f}"

    return score


def fit(
    model: str, prompts: list[str], scenes: int, target: str, steps: int, eval_every: int, score
) -> tuple[list, int]:
    """Fit ``target`` to ``scenes`` ground-truth scenes spread evenly over ``prompts``; ``score(policy)`` at step 0,
    every ``eval_every`` steps and at the end."""
    overrides, lr = TARGETS[target]
    policy = policies.load(apply_overrides(Config(), ["--model.path", model, *overrides]))
    if policy.prediction_type not in ("epsilon", "v_prediction"):
        raise SystemExit(f"{model} predicts {policy.prediction_type!r}; this script fits epsilon or v-prediction.")
    if target == "full":
        policy.unet.requires_grad_(True)
        params = list(policy.unet.parameters())
    else:
        params = policy.trainable_parameters()
    per_prompt = max(1, scenes // len(prompts))
    which = torch.arange(len(prompts)).repeat_interleave(per_prompt)
    images = torch.stack(
        [torch.from_numpy(render(p, seed).copy()).permute(2, 0, 1).float() / 255 for p in prompts
         for seed in range(per_prompt)]
    )  # fmt: skip
    with torch.no_grad():
        latents = torch.cat([policy.vae.encode(chunk * 2 - 1).latent_dist.mean for chunk in images.split(256)])
        latents = latents * policy.vae.config.scaling_factor
    embeds = policy.encode_prompts(prompts)
    optimizer = torch.optim.AdamW(params, lr=lr)
    alphas = policy.alphas_cumprod
    generator = torch.Generator().manual_seed(0)

    def scored() -> str:
        policy.unet.eval()
        result = score(policy)
        policy.unet.train()
        return result

    curve = [(0, scored())]
    for step in range(1, steps + 1):
        index = torch.randint(0, len(latents), (16,), generator=generator)
        t = torch.randint(0, len(alphas), (16,), generator=generator)
        noise = torch.randn(latents[index].shape, generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * latents[index] + (1 - a).sqrt() * noise
        if policy.prediction_type == "v_prediction":
            target = policy.scheduler.get_velocity(latents[index], noise, t)
        else:
            target = noise
        loss = F.mse_loss(policy.unet(x_t, t, embeds[which[index]]).sample, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % eval_every == 0 or step == steps:
            curve.append((step, scored()))
    return curve, sum(p.numel() for p in params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="a diffusers directory (default: the tiny SD)")
    parser.add_argument("--prompt", default="a blue triangle and a red circle")
    parser.add_argument("--prompts", default=None, help="a prompt file or tiny:train: fit them, score held-out")
    parser.add_argument("--heldout", default="tiny:heldout")
    parser.add_argument("--scenes", type=int, default=None, help="default: 512 (one prompt), 1024 (a list)")
    parser.add_argument("--targets", default="attention,blocks,full")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=50)
    args = parser.parse_args()
    if args.prompts:
        prompts, score = load_prompts(args.prompts), heldout_score(load_prompts(args.heldout))
        title = f"{len(prompts)} prompts of {args.prompts}: held-out base reward, then paired gain"
    else:
        prompts, score = [args.prompt], single_prompt_score(args.prompt)
        title = f"{args.prompt!r}: ODE reward of 64 samples"
    scenes = args.scenes or (1024 if args.prompts else 512)
    rows = []
    for target in args.targets.split(","):
        started = time.time()
        curve, count = fit(args.model, prompts, scenes, target, args.steps, args.eval_every, score)
        rows.append((target, count, curve, time.time() - started))
        print(f"{target}: {count} weights, " + ", ".join(f"{s}: {r}" for s, r in curve), flush=True)
    print(f"\n{title} (20 steps, guidance 2) after supervised steps of 16 scenes:")
    steps = [s for s, _ in rows[0][2]]
    print("| trained weights | count | " + " | ".join(str(s) for s in steps) + " | minutes |")
    print("|---" * (len(steps) + 3) + "|")
    for target, count, curve, seconds in rows:
        print(f"| {target} | {count:,} | " + " | ".join(r for _, r in curve) + f" | {seconds / 60:.1f} |")


if __name__ == "__main__":
    main()
