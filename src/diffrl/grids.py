"""Labelled image grids: one row per sampler, one column per prompt, the reward on every tile.

A grid is what a user looks at to see what training did, so it says what it shows: the sampler of each row on its
left, the prompt under each column, and each image's score in its corner. Small images (the embedded tiny models
draw 64x64) are enlarged with nearest-neighbour sampling so that the text fits and pixels stay visible.
"""

from __future__ import annotations

import textwrap

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from diffrl.rewards.combine import to_uint8

MIN_TILE = 128  # pixels; smaller images are enlarged by a whole factor to at least this
FONT_SIZE = 11
LABEL_WIDTH = 150
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default(size=FONT_SIZE)


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    """``text`` broken into lines no wider than ``width`` pixels (a word wider than that gets a line of its own)."""
    per_line = max(4, int(width / max(1.0, draw.textlength("m", font=font))) * 2)
    while per_line > 4:
        lines = textwrap.wrap(text, per_line) or [""]
        if all(draw.textlength(line, font=font) <= width for line in lines):
            return lines
        per_line -= 1
    return textwrap.wrap(text, 4) or [""]


def labelled_grid(
    rows: list[tuple[str, torch.Tensor]],
    prompts: list[str],
    scores: list[torch.Tensor | None] | None = None,
) -> np.ndarray:
    """``[H, W, 3]`` uint8: a row per ``(title, images [N, 3, h, w] in [0, 1])``, a column per prompt (written
    under the column), and, where ``scores[row]`` is given, each tile's score (``[N]``) in its top-left corner."""
    if not rows:
        raise ValueError("a grid needs at least one row of images.")
    columns = len(prompts)
    if any(len(images) < columns for _, images in rows):
        raise ValueError(f"every row needs an image per prompt ({columns}); got {[len(i) for _, i in rows]}.")
    scores = scores or [None] * len(rows)
    h, w = rows[0][1].shape[-2:]
    scale = max(1, -(-MIN_TILE // max(h, w)))
    tile_h, tile_w = h * scale, w * scale
    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = FONT_SIZE + 3
    captions = [_wrap(probe, p, font, tile_w - 6) for p in prompts]
    caption_h = line_h * max(len(c) for c in captions) + 6
    titles = [_wrap(probe, title, font, LABEL_WIDTH - 10) for title, _ in rows]
    pad = 2
    width = LABEL_WIDTH + columns * (tile_w + pad)
    height = len(rows) * (tile_h + pad) + caption_h
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for r, ((_, images), row_scores) in enumerate(zip(rows, scores, strict=True)):
        top = r * (tile_h + pad)
        block = len(titles[r]) * line_h
        for k, line in enumerate(titles[r]):
            draw.text((6, top + (tile_h - block) // 2 + k * line_h), line, fill=INK, font=font)
        tiles = to_uint8(images[:columns])
        for c in range(columns):
            left = LABEL_WIDTH + c * (tile_w + pad)
            tile = Image.fromarray(tiles[c]).resize((tile_w, tile_h), Image.NEAREST)
            canvas.paste(tile, (left, top))
            if row_scores is not None:
                text = f"{float(row_scores[c]):.2f}"
                box = draw.textbbox((left + 3, top + 2), text, font=font)
                draw.rectangle((box[0] - 2, box[1] - 1, box[2] + 2, box[3] + 1), fill=(0, 0, 0))
                draw.text((left + 3, top + 2), text, fill=(255, 255, 255), font=font)
    base = len(rows) * (tile_h + pad) + 3
    for c, lines in enumerate(captions):
        left = LABEL_WIDTH + c * (tile_w + pad) + 3
        for k, line in enumerate(lines):
            draw.text((left, base + k * line_h), line, fill=INK, font=font)
    return np.asarray(canvas)
