"""JPEG (in)compressibility, the DDPO paper's rewards: the image's JPEG size in kB at a fixed quality."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from diffrl.rewards.combine import Reward, to_uint8


def jpeg_sizes_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """JPEG size of each image in kB (1,000 bytes): ``images`` ``[B, 3, H, W]`` float in [0, 1] -> ``[B]``."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"JPEG rewards expect images [B, 3, H, W]; got {tuple(images.shape)}.")
    sizes = []
    for image in to_uint8(images):
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32)


def jpeg_compressibility(quality: int = 95) -> Reward:
    """Reward = minus the JPEG size in kB: smaller files (simpler images) score higher."""

    def jpeg_compressibility(images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        return -jpeg_sizes_kb(images, quality)

    return jpeg_compressibility


def jpeg_incompressibility(quality: int = 95) -> Reward:
    """Reward = the JPEG size in kB: larger files (more detailed images) score higher."""

    def jpeg_incompressibility(images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        return jpeg_sizes_kb(images, quality)

    return jpeg_incompressibility
