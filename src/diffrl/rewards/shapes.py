"""The verifier reward of the shapes world: the fraction of a prompt's constraints an image satisfies.

No weights: objects are found by colour (nearest palette colour, then connected components), counted, classified
by shape (best IoU against an ideal circle, square or upright triangle filling the object's bounding box), and
compared by centroid. A prompt (see :mod:`diffrl.tiny.world`) yields these constraints:

- for each object group (colour c, shape s, count n): an object of colour c is present; exactly n objects have
  colour c; every object of colour c is an s;
- for a position prompt: the subject group's centroid is left of / right of / above / below the reference's;
- nothing else: no object of a colour the prompt does not name.

``shapes`` returns the fraction satisfied in [0, 1]; ``shapes_strict`` returns 1 only when all are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from diffrl.rewards.combine import Reward
from diffrl.tiny.world import BACKGROUND, COLORS, SHAPES, Caption, parse

MIN_AREA = 12  # pixels; smaller components are noise
MAX_COLOR_DISTANCE = 70.0  # RGB (0-255) distance beyond which a pixel belongs to no palette colour
_PALETTE = np.array([BACKGROUND, *COLORS.values()], dtype=np.float32)  # index 0 is the background
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class DetectedObject:
    color: str
    shape: str
    centroid: tuple[float, float]  # (x, y), y pointing down
    area: int


@dataclass(frozen=True)
class Verdict:
    """Which constraints of a caption an image satisfies: ``(name, satisfied)`` pairs, and each one's kind
    (``present``, ``count``, ``shape``, ``relation`` or ``nothing else``) in ``kinds``, in the same order."""

    constraints: tuple[tuple[str, bool], ...]
    kinds: tuple[str, ...]

    @property
    def score(self) -> float:
        return sum(ok for _, ok in self.constraints) / len(self.constraints)

    @property
    def strict(self) -> float:
        return float(all(ok for _, ok in self.constraints))


def _classify_shape(mask: np.ndarray) -> str:
    """The shape whose ideal template, filling the mask's bounding box, has the highest IoU with the mask."""
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    h, w = crop.shape
    # pixel centres in [-1, 1] across the bounding box
    v = (np.arange(h) + 0.5) / h * 2 - 1
    u = (np.arange(w) + 0.5) / w * 2 - 1
    uu, vv = np.meshgrid(u, v)
    templates = {
        "circle": uu**2 + vv**2 <= 1.0,
        "square": np.ones_like(crop, dtype=bool),
        "triangle": np.abs(uu) <= (vv + 1) / 2,  # apex at the top, base at the bottom
    }
    ious = {name: (crop & t).sum() / (crop | t).sum() for name, t in templates.items()}
    return max(SHAPES, key=lambda name: ious[name])


def detect(image: np.ndarray) -> list[DetectedObject]:
    """Objects in an RGB image ``[H, W, 3]`` (uint8, or float in [0, 1])."""
    pixels = image.astype(np.float32)
    if image.dtype != np.uint8:
        pixels = pixels * 255.0
    distances = np.linalg.norm(pixels[:, :, None, :] - _PALETTE[None, None], axis=-1)  # [H, W, 1 + colours]
    nearest = distances.argmin(axis=-1)
    nearest[distances.min(axis=-1) > MAX_COLOR_DISTANCE] = 0
    objects = []
    for index, color in enumerate(COLORS, start=1):
        labels, count = ndimage.label(nearest == index, structure=_EIGHT_CONNECTED)
        for label in range(1, count + 1):
            mask = labels == label
            area = int(mask.sum())
            if area < MIN_AREA:
                continue
            ys, xs = np.nonzero(mask)
            objects.append(DetectedObject(color, _classify_shape(mask), (float(xs.mean()), float(ys.mean())), area))
    return objects


def verify(image: np.ndarray, caption: Caption) -> Verdict:
    """Check one image ``[H, W, 3]`` against a caption."""
    objects = detect(image)
    constraints: list[tuple[str, str, bool]] = []  # (kind, name, satisfied)
    for group in caption.groups:
        mine = [o for o in objects if o.color == group.color]
        constraints.append(("present", f"{group.color} present", len(mine) > 0))
        constraints.append(("count", f"{group.count} {group.color}", len(mine) == group.count))
        shaped = len(mine) > 0 and all(o.shape == group.shape for o in mine)
        constraints.append(("shape", f"{group.color} is {group.shape}", shaped))
    if caption.relation is not None:
        subject = [o for o in objects if o.color == caption.groups[caption.relation.subject].color]
        reference = [o for o in objects if o.color == caption.groups[caption.relation.reference].color]
        holds = False
        if subject and reference:
            sx, sy = np.mean([o.centroid for o in subject], axis=0)
            rx, ry = np.mean([o.centroid for o in reference], axis=0)
            holds = {"left of": sx < rx, "right of": sx > rx, "above": sy < ry, "below": sy > ry}[
                caption.relation.relation
            ]
        constraints.append(("relation", caption.relation.relation, bool(holds)))
    named = {g.color for g in caption.groups}
    constraints.append(("nothing else", "nothing else", all(o.color in named for o in objects)))
    return Verdict(tuple((name, ok) for _, name, ok in constraints), tuple(kind for kind, _, _ in constraints))


def _verdicts(images: torch.Tensor, prompts: list[str]) -> list[Verdict]:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"shapes reward expects images [B, 3, H, W]; got {tuple(images.shape)}.")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"shapes reward got {images.shape[0]} images but {len(prompts)} prompts.")
    captions = [parse(p) for p in prompts]
    array = images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [verify(image, caption) for image, caption in zip(array, captions, strict=True)]


def shapes(images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None) -> torch.Tensor:
    """Fraction of each prompt's constraints satisfied: ``[B]`` float in [0, 1]."""
    return torch.tensor([v.score for v in _verdicts(images, prompts)], dtype=torch.float32)


def shapes_strict(images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None) -> torch.Tensor:
    """1 where every constraint of the prompt is satisfied, else 0: ``[B]`` float."""
    return torch.tensor([v.strict for v in _verdicts(images, prompts)], dtype=torch.float32)


def make_shapes() -> Reward:
    """Registry factory of :func:`shapes` (it needs no weights)."""
    return shapes


def make_shapes_strict() -> Reward:
    """Registry factory of :func:`shapes_strict`."""
    return shapes_strict
