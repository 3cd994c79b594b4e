"""Measure the ``shapes`` verifier on rendered scenes: ground truth, mismatched captions, blur and noise."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from diffrl.rewards.shapes import verify
from diffrl.tiny.world import all_captions, captions_by_kind, render, sample_caption


@dataclass
class VerifierCheck:
    n: int
    mean_score: float  # mean reward of each image with its own caption
    strict_rate: float  # fraction of those with full marks
    mismatched_full_marks: float  # fraction of (image, another scene's caption) pairs given full marks


def degrade(image: np.ndarray, blur_radius: float, noise_std: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian blur (radius in pixels) then additive Gaussian noise (std in 0-255 units)."""
    if blur_radius > 0:
        image = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(blur_radius)))
    if noise_std > 0:
        image = np.clip(image.astype(np.float32) + rng.normal(0.0, noise_std, image.shape), 0, 255).astype(np.uint8)
    return image


def check_verifier(n: int = 2000, seed: int = 0, blur_radius: float = 0.0, noise_std: float = 0.0) -> VerifierCheck:
    """Score ``n`` rendered scenes against their own captions and against another scene's caption."""
    rng = random.Random(seed)
    noise_rng = np.random.default_rng(seed)
    by_kind = captions_by_kind()
    everything = all_captions()
    scores, strict, mismatched = [], [], []
    for i in range(n):
        caption = sample_caption(rng, by_kind)
        image = degrade(render(caption, seed * 1_000_003 + i), blur_radius, noise_std, noise_rng)
        verdict = verify(image, caption)
        scores.append(verdict.score)
        strict.append(verdict.strict)
        other = rng.choice(everything)
        while other == caption:
            other = rng.choice(everything)
        mismatched.append(verify(image, other).strict)
    return VerifierCheck(n, float(np.mean(scores)), float(np.mean(strict)), float(np.mean(mismatched)))
