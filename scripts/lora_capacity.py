"""What can the trained weights learn of one prompt, with no RL? Supervised denoising on the world's own scenes.

    python scripts/lora_capacity.py [--prompt "a blue triangle and a red circle"] [--targets attention,blocks,full]
        [--steps 300] [--eval-every 50]

For each set of trained weights it fits the embedded tiny SD to ground-truth scenes of one prompt (the world's
renders of it, encoded by the model's VAE) with the ordinary denoising loss (epsilon, uniform timesteps, AdamW, 16
scenes a step), and every ``--eval-every`` steps scores 64 ODE samples of the prompt (20 steps, guidance 2, the
same noise each time) with the ``shapes`` verifier. The targets:

- ``attention``: LoRA rank 8 on the attention projections (the LoRA default, lr 1e-3);
- ``blocks``: LoRA rank 16 on ``diffrl.config.UNET_BLOCKS`` (attention, feed-forward, transformer projections and
  ResNet convolutions; lr 1e-3);
- ``full``: every UNet weight (lr 3e-4).

A trainer cannot make a model draw what these weights cannot learn from the answer itself: where supervised
fitting stalls, RL on the same weights stalls too.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from diffrl import policies
from diffrl.config import UNET_BLOCKS, Config, apply_overrides
from diffrl.rewards.shapes import shapes
from diffrl.sampling.rollout import rollout
from diffrl.tiny.world import render

TARGETS = {
    "attention": (["--lora.rank", "8", "--lora.alpha", "8"], 1e-3),
    "blocks": (["--lora.rank", "16", "--lora.alpha", "16", "--lora.target_modules", ",".join(UNET_BLOCKS)], 1e-3),
    "full": (["--lora.rank", "8", "--lora.alpha", "8"], 3e-4),
}


def fit(
    prompt: str, target: str, steps: int, eval_every: int, scenes: int = 512
) -> tuple[list[tuple[int, float]], int]:
    overrides, lr = TARGETS[target]
    policy = policies.load(apply_overrides(Config(), ["--model.path", "tiny", *overrides]))
    if target == "full":
        policy.unet.requires_grad_(True)
        params = list(policy.unet.parameters())
    else:
        params = policy.trainable_parameters()
    images = torch.stack(
        [torch.from_numpy(render(prompt, seed).copy()).permute(2, 0, 1).float() / 255 for seed in range(scenes)]
    )
    with torch.no_grad():
        latents = policy.vae.encode(images * 2 - 1).latent_dist.mean * policy.vae.config.scaling_factor
    embeds = policy.encode_prompts([prompt])
    optimizer = torch.optim.AdamW(params, lr=lr)
    alphas = policy.alphas_cumprod
    generator = torch.Generator().manual_seed(0)

    def score() -> float:
        policy.unet.eval()
        with torch.no_grad():
            out = rollout(policy, [prompt] * 64, list(range(1000, 1064)), eta=0.0, num_steps=20, guidance_scale=2.0)
        policy.unet.train()
        return shapes(out.images, [prompt] * 64).mean().item()

    curve = [(0, score())]
    for step in range(1, steps + 1):
        index = torch.randint(0, scenes, (16,), generator=generator)
        t = torch.randint(0, len(alphas), (16,), generator=generator)
        noise = torch.randn(latents[index].shape, generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * latents[index] + (1 - a).sqrt() * noise
        loss = F.mse_loss(policy.unet(x_t, t, embeds.expand(16, -1, -1)).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % eval_every == 0 or step == steps:
            curve.append((step, score()))
    return curve, sum(p.numel() for p in params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", default="a blue triangle and a red circle")
    parser.add_argument("--targets", default="attention,blocks,full")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=50)
    args = parser.parse_args()
    rows = []
    for target in args.targets.split(","):
        started = time.time()
        curve, count = fit(args.prompt, target, args.steps, args.eval_every)
        rows.append((target, count, curve, time.time() - started))
        print(f"{target}: {count} weights, " + ", ".join(f"{s}: {r:.3f}" for s, r in curve), flush=True)
    print(f"\n{args.prompt!r}, ODE reward of 64 samples (20 steps, guidance 2) after supervised steps:")
    steps = [s for s, _ in rows[0][2]]
    print("| trained weights | count | " + " | ".join(str(s) for s in steps) + " | minutes |")
    print("|---" * (len(steps) + 3) + "|")
    for target, count, curve, seconds in rows:
        print(f"| {target} | {count:,} | " + " | ".join(f"{r:.2f}" for _, r in curve) + f" | {seconds / 60:.1f} |")


if __name__ == "__main__":
    main()
