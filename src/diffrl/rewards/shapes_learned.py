"""A learned, differentiable proxy of the shapes verifier: a small image-text scorer trained to predict
:func:`diffrl.rewards.shapes.shapes` (``scripts/train_shapes_scorer.py``), shipped beside the tiny models.

It exists to be over-optimised: train on ``shapes_learned`` (DRaFT, or any trainer) and evaluate on ``shapes`` to see
where the proxy keeps rising while the verifier stops. The caption is read word by word (a vocabulary of the world's
grammar) by a GRU; the image by a small CNN with coordinate channels, modulated by the caption (FiLM); the score is a
sigmoid in [0, 1], with gradients to the image.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from diffrl.tiny.world import COLORS, COUNT_WORDS, IMAGE_SIZE, SHAPES

WORDS = ("a", "and", "left", "right", "of", "above", "below", *COUNT_WORDS.values(), *COLORS,
         *SHAPES, *(s + "s" for s in SHAPES))  # fmt: skip
VOCAB = {word: i + 2 for i, word in enumerate(WORDS)}  # 0: padding, 1: a word the grammar does not have
MAX_WORDS = 12
SHIPPED = Path(__file__).resolve().parents[1] / "tiny" / "scorer"


def tokenize(prompts: list[str]) -> torch.Tensor:
    """Word ids ``[B, MAX_WORDS]`` (0-padded; unknown words are 1)."""
    ids = torch.zeros(len(prompts), MAX_WORDS, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        words = [VOCAB.get(w, 1) for w in prompt.lower().split()][:MAX_WORDS]
        ids[row, : len(words)] = torch.tensor(words, dtype=torch.long)
    return ids


class ShapesScorer(nn.Module):
    """``(images [B, 3, 64, 64] in [0, 1], word ids [B, L]) -> logits [B]``."""

    def __init__(self, width: int = 64, text_width: int = 64):
        super().__init__()
        self.config = {"width": width, "text_width": text_width}
        self.embed = nn.Embedding(len(VOCAB) + 2, text_width, padding_idx=0)
        self.gru = nn.GRU(text_width, 2 * width, batch_first=True)
        self.pixels = nn.Conv2d(3, width // 2, 1)  # per-pixel colour features, before the caption scales them
        channels = [width // 2 + 2, width // 2, width, 2 * width]  # colour features and two coordinate channels
        self.convs = nn.ModuleList(
            nn.Conv2d(channels[i], channels[i + 1], 3, stride=2, padding=1) for i in range(3)
        )  # 64 -> 32 -> 16 -> 8
        # the caption scales and shifts the per-pixel colour features and every layer's (FiLM)
        self.films = nn.ModuleList(nn.Linear(2 * width, 2 * c) for c in (width // 2, *channels[1:]))
        self.head_conv = nn.Conv2d(2 * width, width, 3, stride=2, padding=1)  # 8 -> 4
        # the head reads the 4x4 map (where), the 8x8 features' mean and max (what, wherever it is) and the caption
        self.head = nn.Sequential(nn.Linear(width * 16 + 6 * width, 2 * width), nn.SiLU(), nn.Linear(2 * width, 1))

    def _film(self, x: torch.Tensor, text: torch.Tensor, index: int) -> torch.Tensor:
        scale, shift = self.films[index](text).chunk(2, dim=1)
        return x * (1 + scale[:, :, None, None]) + shift[:, :, None, None]

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        lengths = (ids > 0).sum(dim=1).clamp(min=1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(self.embed(ids), lengths, batch_first=True, enforce_sorted=False)
        return self.gru(packed)[1][0]  # the last hidden state [B, 2 width]

    def forward(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        batch = images.shape[0]
        side = torch.linspace(-1, 1, images.shape[-1], device=images.device, dtype=images.dtype)
        ys, xs = torch.meshgrid(side, side, indexing="ij")
        text = self.encode_text(ids.to(images.device))
        x = self._film(F.silu(self.pixels(images * 2 - 1)), text, 0)
        x = torch.cat([x, xs.expand(batch, 1, -1, -1), ys.expand(batch, 1, -1, -1)], dim=1)
        for i, conv in enumerate(self.convs):
            x = self._film(F.silu(conv(x)), text, i + 1)
        pooled = torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)
        x = F.silu(self.head_conv(x)).flatten(1)
        return self.head(torch.cat([x, pooled, text], dim=1)).squeeze(1)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Scores in [0, 1] ``[B]`` of 64x64 ``images`` in [0, 1] against ``prompts``."""
        return torch.sigmoid(self(images, tokenize(prompts)))


def load_scorer(directory: str | Path = SHIPPED) -> ShapesScorer:
    directory = Path(directory)
    weights, config = directory / "model.safetensors", directory / "config.json"
    if not weights.exists() or not config.exists():
        raise FileNotFoundError(
            f"no shapes scorer in {directory} (model.safetensors and config.json); train one with "
            "python scripts/train_shapes_scorer.py."
        )
    model = ShapesScorer(**json.loads(config.read_text()))
    model.load_state_dict(load_file(weights))
    return model.eval().requires_grad_(False)


class LearnedShapesReward:
    """The scorer as a reward: ``images [B, 3, H, W]`` in [0, 1] (resized to 64x64) -> ``[B]`` in [0, 1]."""

    def __init__(self, directory: str | Path = SHIPPED):
        self.model = load_scorer(directory)

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"shapes_learned expects images [B, 3, H, W]; got {tuple(images.shape)}.")
        model = self.model.to(images.device)
        x = images.float().clamp(0, 1)
        if x.shape[-1] != IMAGE_SIZE or x.shape[-2] != IMAGE_SIZE:
            x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True, align_corners=False)
        return model.score(x, prompts)


def make_shapes_learned(directory: str | None = None) -> LearnedShapesReward:
    """Registry factory of the shipped scorer (``directory``: another one)."""
    return LearnedShapesReward(directory or SHIPPED)
