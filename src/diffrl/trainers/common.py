"""The maths the trainers share, as pure functions: advantages, the clipped surrogate, KL, timestep subsampling."""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass
from typing import Literal

import torch

EPS = 1e-4  # added to a reward std before dividing (as DDPO and Flow-GRPO do)


# ---------------------------------------------------------------------------------------------------------------
# advantages


class PerPromptStatTracker:
    """DDPO's per-prompt reward normalisation with a buffer that persists across epochs.

    Each prompt keeps its last ``buffer_size`` rewards; a prompt with fewer than ``min_count`` uses the statistics
    of the whole batch instead. :meth:`state_dict` / :meth:`load_state_dict` make it part of a checkpoint.
    """

    def __init__(self, buffer_size: int = 32, min_count: int = 16):
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.buffers: dict[str, deque[float]] = {}

    def update(self, prompts: list[str], rewards: torch.Tensor) -> torch.Tensor:
        """Add this batch's rewards and return its advantages ``(r - mean) / (std + eps)``, ``[N]``."""
        rewards = rewards.detach().double().cpu()
        advantages = torch.empty_like(rewards)
        batch_mean, batch_std = rewards.mean(), rewards.std(unbiased=False)
        for prompt in dict.fromkeys(prompts):
            rows = torch.tensor([p == prompt for p in prompts])
            buffer = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(rewards[rows].tolist())
            if len(buffer) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                history = torch.tensor(list(buffer), dtype=torch.float64)
                mean, std = history.mean(), history.std(unbiased=False)
            advantages[rows] = (rewards[rows] - mean) / (std + EPS)
        return advantages.float()

    def state_dict(self) -> dict:
        return {"buffer_size": self.buffer_size, "min_count": self.min_count, "buffers": {
            prompt: list(values) for prompt, values in self.buffers.items()
        }}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.buffer_size = state["buffer_size"]
        self.min_count = state["min_count"]
        self.buffers = {p: deque(v, maxlen=self.buffer_size) for p, v in state["buffers"].items()}


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    valid: torch.Tensor | None = None,
    *,
    scale: Literal["group", "batch", "none"] = "group",
    batch_std: float | None = None,
) -> torch.Tensor:
    """GRPO: ``(r - mean_group) / s`` for consecutive groups of ``group_size``: ``[N] -> [N]``.

    ``scale`` picks ``s``: ``"group"`` the group's own std (GRPO), ``"batch"`` the std of the whole global batch,
    given as ``batch_std`` (Flow-GRPO's global std: a group whose rewards are nearly equal keeps small advantages
    instead of having its noise blown up to unit size), ``"none"`` 1 (Dr. GRPO). Samples where ``valid`` is False
    (dropped rewards) are left out of their group's statistics and get 0.
    """
    if rewards.ndim != 1 or rewards.shape[0] % group_size != 0:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}.")
    if scale == "batch" and batch_std is None:
        raise ValueError("scale='batch' needs batch_std, the std of the global batch's rewards.")
    valid = torch.ones_like(rewards, dtype=torch.bool) if valid is None else valid
    groups = torch.where(valid, rewards, torch.zeros_like(rewards)).double().view(-1, group_size)
    weights = valid.double().view(-1, group_size)
    count = weights.sum(dim=1, keepdim=True).clamp(min=1)
    mean = (groups * weights).sum(dim=1, keepdim=True) / count
    centred = (groups - mean) * weights
    if scale == "group":
        centred = centred / ((centred**2).sum(dim=1, keepdim=True) / count).sqrt().add(EPS)
    elif scale == "batch":
        centred = centred / (batch_std + EPS)
    return centred.view(-1).float()


def clip_advantages(advantages: torch.Tensor, max_abs: float) -> torch.Tensor:
    return advantages.clamp(-max_abs, max_abs)


# ---------------------------------------------------------------------------------------------------------------
# losses


@dataclass
class PolicyLoss:
    """The loss of one micro-batch step and its diagnostics (all scalars)."""

    loss: torch.Tensor
    ratio_mean: torch.Tensor
    clip_fraction: torch.Tensor
    approx_kl: torch.Tensor
    ratio_max_abs_dev: torch.Tensor  # max |ratio - 1| over the micro-batch


def clipped_surrogate_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> PolicyLoss:
    """PPO's clipped surrogate, as DDPO-IS and GRPO use it: ``mean(max(-A r, -A clip(r, 1-c, 1+c)))``.

    ``log_prob``, ``old_log_prob`` and ``advantages`` are ``[N]``; ``r = exp(log_prob - old_log_prob)``.
    """
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        clip_fraction = ((ratio - 1.0).abs() > clip_range).float().mean()
        approx_kl = 0.5 * ((log_prob - old_log_prob) ** 2).mean()
        max_dev = (ratio - 1.0).abs().max()
    return PolicyLoss(loss, ratio.detach().mean(), clip_fraction, approx_kl, max_dev)


def score_function_loss(log_prob: torch.Tensor, advantages: torch.Tensor) -> PolicyLoss:
    """DDPO-SF (REINFORCE): ``mean(-A log p)``; on-policy, so the ratio is 1 by construction."""
    loss = (-advantages * log_prob).mean()
    zero = torch.zeros((), device=log_prob.device)
    return PolicyLoss(loss, torch.ones((), device=log_prob.device), zero, zero, zero)


def gaussian_kl(mean: torch.Tensor, reference_mean: torch.Tensor, std: torch.Tensor, reduction: str) -> torch.Tensor:
    """KL(N(mean, std^2) || N(reference_mean, std^2)) per sample, ``[B]``: ``(mean - ref)^2 / (2 std^2)``, reduced
    over non-batch elements like the log-probability (``"mean"`` or ``"sum"``). Holds for VP and flow steps alike,
    whose policy and reference transitions share the same std."""
    kl = (mean - reference_mean) ** 2 / (2.0 * std**2)
    dims = tuple(range(1, kl.ndim))
    return kl.mean(dim=dims) if reduction == "mean" else kl.sum(dim=dims)


# ---------------------------------------------------------------------------------------------------------------
# timesteps


def subsample_timesteps(
    sde_mask: torch.Tensor, batch_size: int, fraction: float, generator: torch.Generator
) -> torch.Tensor:
    """For each of ``batch_size`` samples, an independent random order of the stochastic steps, cut to
    ``ceil(fraction * num_stochastic)`` steps: ``[batch_size, K]`` step indices (DDPO's per-sample shuffle)."""
    stochastic = sde_mask.nonzero().flatten().cpu()
    if len(stochastic) == 0:
        raise ValueError("no stochastic step to train: eta is 0 or the SDE window is empty.")
    keep = max(1, int(torch.tensor(fraction * len(stochastic)).ceil().item()))
    orders = [stochastic[torch.randperm(len(stochastic), generator=generator)[:keep]] for _ in range(batch_size)]
    return torch.stack(orders) if orders else torch.empty(0, keep, dtype=torch.long)


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers, the same on every platform and process."""
    return random.Random(":".join(str(p) for p in parts)).getrandbits(63)


# ---------------------------------------------------------------------------------------------------------------
# DiffusionNFT (Zheng et al., 2025): negative-aware fine-tuning on the forward process


def optimality_probability(advantages: torch.Tensor, max_abs: float) -> torch.Tensor:
    """DiffusionNFT's ``r`` in [0, 1]: an advantage clipped to ``[-max_abs, max_abs]`` and mapped linearly, so that
    the group's mean is 1/2, ``+max_abs`` is 1 (only the positive policy is fitted) and ``-max_abs`` is 0."""
    if not max_abs > 0:
        raise ValueError(f"the advantage clip must be > 0; got {max_abs}.")
    return (advantages.clamp(-max_abs, max_abs) / max_abs / 2 + 0.5).clamp(0.0, 1.0)


@dataclass
class NFTLoss:
    """The per-sample negative-aware loss and what it is made of.

    Attributes:
        loss: ``[B]``, ``(r L+ + (1 - r) L-) / beta``.
        positive: ``[B]`` L+, the adaptively weighted x0 error of the implicit positive policy.
        negative: ``[B]`` L-, the same for the implicit negative policy.
    """

    loss: torch.Tensor
    positive: torch.Tensor
    negative: torch.Tensor


def nft_loss(
    prediction: torch.Tensor,
    old_prediction: torch.Tensor,
    x0: torch.Tensor,
    r: torch.Tensor,
    beta: float,
) -> NFTLoss:
    """DiffusionNFT's loss at one noised clean sample ``x0``, written in the clean samples the networks predict.

    The trained network's clean prediction ``p`` and the sampling policy's ``p_old`` (no gradient) define an
    implicit positive policy ``p+ = beta p + (1 - beta) p_old`` and a negative one ``p- = (1 + beta) p_old - beta p``.
    A sample with optimality ``r`` pulls the positive policy towards its ``x0`` with weight ``r`` and the negative
    one with ``1 - r``, so that training moves the network from the bad samples towards the good ones. Each
    squared error is divided by its own (detached) mean absolute error, the paper's adaptive weighting, which keeps
    every timestep's loss on one scale.

    At a given ``x_t`` the clean prediction is an affine function of what the network outputs (a flow model's
    velocity ``v``: ``x_t - t v``; a VP model's noise ``eps``: ``(x_t - sqrt(1 - a) eps) / sqrt(a)``), and each
    implicit policy's weights sum to one, so these mixtures are the paper's mixtures of velocities for a flow model
    and the same construction for a noise-predicting one.

    Args:
        prediction, old_prediction, x0: ``[B, ...]`` clean samples (predicted; the sampled one).
        r: ``[B]`` optimality probabilities (:func:`optimality_probability`).
        beta: the step size of the implicit policies, > 0.
    """
    if not beta > 0:
        raise ValueError(f"DiffusionNFT's beta must be > 0; got {beta}.")
    dims = tuple(range(1, x0.ndim))
    old = old_prediction.detach()

    def weighted_error(x0_prediction: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            weight = (x0_prediction.double() - x0.double()).abs().mean(dim=dims, keepdim=True).clamp(min=1e-5)
        return ((x0_prediction - x0) ** 2 / weight.to(x0_prediction.dtype)).mean(dim=dims)

    positive = weighted_error(beta * prediction + (1 - beta) * old)
    negative = weighted_error((1 + beta) * old - beta * prediction)
    return NFTLoss(loss=(r * positive + (1 - r) * negative) / beta, positive=positive, negative=negative)
