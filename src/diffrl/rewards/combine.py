"""Several rewards as one: a weighted sum that checks every part and keeps each for logging."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

Reward = Callable[[torch.Tensor, list[str], list[dict]], torch.Tensor]
"""``reward(images [B, 3, H, W] float in [0, 1], prompts, metadata) -> float [B]``."""


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[B, 3, H, W]`` float in [0, 1] -> ``[B, H, W, 3]`` uint8 (clamped, rounded to nearest): what a reward sees
    from a saved image."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class RewardError(RuntimeError):
    """A reward raised, or returned something other than B finite numbers."""


@dataclass
class RewardOutput:
    """Scores of one batch.

    Attributes:
        total: weighted sum of the parts, ``[B]`` float32; NaN where a sample was dropped.
        parts: each reward's own (unweighted) score, ``[B]`` float32, by name.
        valid: ``[B]`` bool; False where a part was non-finite and ``on_invalid="drop"``.
    """

    total: torch.Tensor
    parts: dict[str, torch.Tensor]
    valid: torch.Tensor

    @property
    def num_dropped(self) -> int:
        return int((~self.valid).sum())


def check_scores(name: str, scores: object, batch_size: int, batch_index: int | None = None) -> torch.Tensor:
    """``scores`` as a float32 ``[B]`` tensor, or a :class:`RewardError` naming the reward and what is wrong."""
    where = f"reward {name!r}" + ("" if batch_index is None else f" (batch {batch_index})")
    if not isinstance(scores, torch.Tensor):
        raise RewardError(
            f"{where} returned {type(scores).__name__}; a reward must return a torch.Tensor of shape [B]."
        )
    if scores.shape != (batch_size,):
        raise RewardError(
            f"{where} returned shape {tuple(scores.shape)} for {batch_size} images; it must return one score per "
            f"image, shape [{batch_size}]."
        )
    if not (scores.is_floating_point() or scores.dtype in (torch.int32, torch.int64, torch.bool)):
        raise RewardError(f"{where} returned dtype {scores.dtype}; return floats.")
    return scores.detach().to(device="cpu", dtype=torch.float32)


class WeightedSum:
    """``sum_i w_i * reward_i(images, prompts, metadata)``, checking each part.

    Args:
        rewards: name -> (reward callable, weight).
        on_invalid: ``"raise"`` (default): a non-finite score is a :class:`RewardError`; ``"drop"``: the sample's
            total is NaN, ``valid`` is False for it, and :attr:`num_dropped` counts it, so the trainer can leave it
            out. A wrong shape or an exception always raises.
    """

    def __init__(self, rewards: Mapping[str, tuple[Reward, float]], on_invalid: str = "raise"):
        if not rewards:
            raise ValueError("weighted_sum needs at least one reward.")
        if on_invalid not in ("raise", "drop"):
            raise ValueError(f"on_invalid must be 'raise' or 'drop'; got {on_invalid!r}.")
        for name, (fn, weight) in rewards.items():
            if not callable(fn):
                raise TypeError(f"reward {name!r} is {type(fn).__name__}, not a callable.")
            if not math.isfinite(weight):
                raise ValueError(f"reward {name!r} has weight {weight}; weights must be finite numbers.")
        self.rewards = dict(rewards)
        self.on_invalid = on_invalid
        self.num_dropped = 0

    @property
    def names(self) -> list[str]:
        return list(self.rewards)

    def score(
        self,
        images: torch.Tensor,
        prompts: list[str],
        metadata: list[dict] | None = None,
        batch_index: int | None = None,
    ) -> RewardOutput:
        batch_size = images.shape[0]
        metadata = metadata if metadata is not None else [{} for _ in range(batch_size)]
        parts: dict[str, torch.Tensor] = {}
        total = torch.zeros(batch_size)
        valid = torch.ones(batch_size, dtype=torch.bool)
        for name, (fn, weight) in self.rewards.items():
            try:
                raw = fn(images, prompts, metadata)
            except KeyboardInterrupt:
                raise
            except BaseException as error:  # SystemExit too: a reward that calls sys.exit() must not end the run
                # with exit status 0 and nothing trained
                where = f"reward {name!r}" + ("" if batch_index is None else f" (batch {batch_index})")
                raise RewardError(f"{where} raised {type(error).__name__}: {error}") from error
            scores = check_scores(name, raw, batch_size, batch_index)
            finite = torch.isfinite(scores)
            if not bool(finite.all()):
                if self.on_invalid == "raise":
                    bad = (~finite).nonzero().flatten().tolist()
                    raise RewardError(
                        f"reward {name!r} returned non-finite scores for samples {bad} of {batch_size}"
                        + ("" if batch_index is None else f" in batch {batch_index}")
                        + "; fix the reward, or set reward.on_invalid='drop' to drop and count such samples."
                    )
                valid &= finite
            parts[name] = scores
            total = total + weight * scores
        total = torch.where(valid, total, torch.full_like(total, math.nan))
        self.num_dropped += int((~valid).sum())
        return RewardOutput(total=total, parts=parts, valid=valid)

    def differentiable(
        self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(total [B], parts)`` with gradients to ``images`` (direct reward fine-tuning): each part is checked as
        :meth:`score` checks it, must be finite, and must depend on the images differentiably, except a part of
        weight 0, which is only watched (scored without gradients and logged, e.g. a verifier beside its learned
        proxy: ``shapes_learned,shapes=0``)."""
        batch_size = images.shape[0]
        metadata = metadata if metadata is not None else [{} for _ in range(batch_size)]
        total, parts = 0.0, {}
        for name, (fn, weight) in self.rewards.items():
            watched = weight == 0
            try:
                with torch.no_grad() if watched else contextlib.nullcontext():
                    raw = fn(images, prompts, metadata)
            except KeyboardInterrupt:
                raise
            except BaseException as error:
                raise RewardError(f"reward {name!r} raised {type(error).__name__}: {error}") from error
            check_scores(name, raw, batch_size)
            if not watched and images.requires_grad and not raw.requires_grad:
                raise RewardError(
                    f"reward {name!r} is not differentiable (its score carries no gradient to the image); direct "
                    "reward fine-tuning back-propagates through it: use a differentiable reward (aesthetic, "
                    "pickscore, clipscore, hpsv2, imagereward or your own torch function) or a policy-gradient "
                    "algorithm (grpo, ddpo_is)."
                )
            scores = raw.float()
            if not bool(torch.isfinite(scores.detach()).all()):
                raise RewardError(f"reward {name!r} returned non-finite scores; fix the reward.")
            parts[name] = scores
            total = total + weight * scores
        return total, parts

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None) -> torch.Tensor:
        return self.score(images, prompts, metadata).total
