"""How much of a policy-gradient update is signal? Compare trainer settings before spending training runs on them.

    python scripts/gradient_agreement.py --recipe recipes/grpo_tiny.py --batches 4 [--section.key value ...]

Samples ``--batches`` epochs of the recipe (its prompts, groups, eta, SDE window and reward) with the untrained
LoRA (or ``--model.init_weights``) and computes, per group, the gradient of the recipe's loss on that group alone,
as an epoch's first update would (on-policy: every importance ratio is 1). Groups are independent draws of the same
expected gradient ``S``, each with noise ``N``: the mean dot product of two different groups' gradients estimates
``|S|^2`` and a group's squared norm ``|S|^2 + |N|^2``. From them, for an update of the recipe's groups (all of an
epoch's, divided by its updates):

- ``snr``: the update's squared signal-to-noise, ``m |S|^2 / |N|^2`` for ``m`` groups an update;
- ``cos_true``: the expected cosine between the update and the expected gradient, ``sqrt(snr / (1 + snr))``.

An update that is mostly noise (``cos_true`` well below 1) spends its learning rate on a random walk: raising the
learning rate or the number of updates then moves the weights but not the reward. Pairs are pooled over every
epoch; the standard errors leave one epoch out at a time (jackknife). GRPO recipes only.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time

import torch

from diffrl.config import apply_overrides
from diffrl.evaluation import gradient_signal_and_noise
from diffrl.loading import load_recipe
from diffrl.trainers import GRPOTrainer


def group_gradient(trainer: GRPOTrainer, samples, advantages: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The flattened LoRA gradient of the recipe's loss on one group's trajectories ``rows`` (every trained step,
    ratio 1), as float64."""
    trainer.optimizer.zero_grad(set_to_none=True)
    steps = samples.trajectory.sde_mask.nonzero().flatten().tolist()
    for step in steps:
        loss, _, _ = trainer.step_loss(samples, rows, torch.full_like(rows, step), advantages[rows])
        (loss.loss / len(steps)).backward()
    grads = [p.grad.flatten() if p.grad is not None else torch.zeros(p.numel()) for p in trainer.params]
    return torch.cat(grads).detach().double()


def agreement(signal: float, noise: float, groups_per_update: int) -> tuple[float, float]:
    """``(snr, cos_true)`` of an update of ``groups_per_update`` groups from one group's ``|S|^2`` and ``E|N|^2`` (a
    negative signal estimate counts as 0)."""
    snr = groups_per_update * max(signal, 0.0) / noise
    return snr, math.sqrt(snr / (1 + snr))


def jackknife(values: list[float], full: float) -> float:
    n = len(values)
    return math.sqrt((n - 1) / n * sum((v - full) ** 2 for v in values)) if n > 1 else math.nan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/grpo_tiny.py")
    parser.add_argument("--batches", type=int, default=4, help="epochs sampled (their groups are pooled)")
    args, overrides = parser.parse_known_args()
    config = load_recipe(args.recipe)()
    with tempfile.TemporaryDirectory() as scratch:
        config = apply_overrides(
            config,
            [*overrides, "--logging.output_dir", scratch, "--eval.every_epochs", "0",
             "--logging.progress_bars", "false"],
        )  # fmt: skip
        if config.train.algorithm != "grpo":
            raise SystemExit(f"{args.recipe}: train.algorithm {config.train.algorithm!r}; this script measures grpo")
        trainer = GRPOTrainer(config)
        k = config.train.group_size
        per_epoch = []
        started = time.perf_counter()
        for epoch in range(args.batches):
            samples = trainer.sample_epoch(epoch, trainer.epoch_sampler(epoch))
            advantages = trainer.advantages(samples, trainer.gather_rewards(samples))
            groups = torch.arange(len(samples)).view(-1, k)
            per_epoch.append(torch.stack([group_gradient(trainer, samples, advantages, rows) for rows in groups]))
        trainer.finish()
    train = config.train
    groups_per_update = train.batch_size * train.gradient_accumulation_steps // k
    gradients = torch.cat(per_epoch)
    signal, noise = gradient_signal_and_noise(gradients)
    snr, cos = agreement(signal, noise, groups_per_update)
    left_out = [
        agreement(*gradient_signal_and_noise(torch.cat(per_epoch[:e] + per_epoch[e + 1 :])), groups_per_update)
        for e in range(len(per_epoch))
    ]
    print(
        f"{args.recipe} {' '.join(overrides)}: {args.batches} epochs, {len(gradients)} groups of {k}, "
        f"{groups_per_update} groups an update, {(time.perf_counter() - started) / 60:.1f} min"
    )
    print("| signal / noise per group (squared) | snr of an update | cos_true |")
    print("|---|---|---|")
    print(
        f"| {signal / noise:.4f} | {snr:.3f} ± {jackknife([v[0] for v in left_out], snr):.3f} "
        f"| {cos:.3f} ± {jackknife([v[1] for v in left_out], cos):.3f} |"
    )


if __name__ == "__main__":
    main()
