"""The shapes world: flat-coloured shapes on a plain background, and the captions that describe them.

A caption follows a small grammar with four kinds of prompt::

    single    a red circle
    count     three blue squares                      (two, three or four objects)
    binding   a green triangle and a yellow circle     (two different colours)
    position  a red square left of a blue circle       (left of, right of, above, below; two different colours)

Every prompt parses into a :class:`Caption`: one :class:`ObjectGroup` per colour and at most one
:class:`Relation`. :func:`render` draws a 64x64 scene that satisfies a caption, deterministically from a seed, with
its objects in fixed slots (:func:`place`); :mod:`diffrl.rewards.shapes` checks any image against a caption.

The prompt space is split by a fixed rule (:func:`is_held_out`) into training prompts and held-out prompts, unseen
combinations of seen colours and shapes, shipped as ``prompts/train.txt`` and ``prompts/heldout.txt``.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from importlib import resources

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SUPERSAMPLE = 4  # scenes are drawn at 4x and downsampled, so edges are anti-aliased
BACKGROUND = (225, 225, 225)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 215),
    "yellow": (240, 200, 30),
    "purple": (145, 55, 185),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COUNT_WORDS: dict[int, str] = {2: "two", 3: "three", 4: "four"}
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
KINDS: tuple[str, ...] = ("single", "count", "binding", "position")


@dataclass(frozen=True)
class ObjectGroup:
    """``count`` objects of one colour and shape."""

    color: str
    shape: str
    count: int = 1


@dataclass(frozen=True)
class Relation:
    """``subject`` (index into the caption's groups) is ``relation`` the ``reference`` group."""

    relation: str
    subject: int = 0
    reference: int = 1


@dataclass(frozen=True)
class Caption:
    kind: str
    groups: tuple[ObjectGroup, ...]
    relation: Relation | None = None

    @property
    def text(self) -> str:
        return caption_text(self)


def caption_text(caption: Caption) -> str:
    """The prompt string for a caption (the inverse of :func:`parse`)."""
    first = caption.groups[0]
    if caption.kind == "single":
        return f"a {first.color} {first.shape}"
    if caption.kind == "count":
        return f"{COUNT_WORDS[first.count]} {first.color} {first.shape}s"
    second = caption.groups[1]
    joiner = "and" if caption.kind == "binding" else caption.relation.relation
    return f"a {first.color} {first.shape} {joiner} a {second.color} {second.shape}"


def parse(prompt: str) -> Caption:
    """Parse a prompt of the shapes grammar; anything else is a ``ValueError`` that says what the grammar accepts."""
    words = prompt.strip().lower().split()
    count_by_word = {word: n for n, word in COUNT_WORDS.items()}

    def object_at(i: int) -> ObjectGroup:
        if words[i] != "a" or words[i + 1] not in COLORS or words[i + 2] not in SHAPES:
            raise IndexError
        return ObjectGroup(words[i + 1], words[i + 2])

    try:
        if words and words[0] in count_by_word:
            color, plural = words[1], words[2]
            if len(words) != 3 or color not in COLORS or not plural.endswith("s") or plural[:-1] not in SHAPES:
                raise IndexError
            return Caption("count", (ObjectGroup(color, plural[:-1], count_by_word[words[0]]),))
        if len(words) == 3:
            return Caption("single", (object_at(0),))
        first = object_at(0)
        rest = words[3:]
        if rest[:1] == ["and"]:
            kind, relation, tail = "binding", None, rest[1:]
        elif " ".join(rest[:2]) in RELATIONS:
            kind, relation, tail = "position", Relation(" ".join(rest[:2])), rest[2:]
        elif rest[:1] and rest[0] in RELATIONS:
            kind, relation, tail = "position", Relation(rest[0]), rest[1:]
        else:
            raise IndexError
        if len(tail) != 3:
            raise IndexError
        second = ObjectGroup(tail[1], tail[2])
        if tail[0] != "a" or second.color not in COLORS or second.shape not in SHAPES or first.color == second.color:
            raise IndexError
        return Caption(kind, (first, second), relation)
    except IndexError:
        raise ValueError(
            f"{prompt!r} is not a prompt of the shapes grammar. It accepts 'a red circle', 'three blue squares', "
            "'a green triangle and a yellow circle' and 'a red square left of a blue circle' (also right of, "
            f"above, below), with colours {', '.join(COLORS)}, shapes {', '.join(SHAPES)}, counts two to four, "
            "and two different colours in a two-object prompt."
        ) from None


def all_captions() -> list[Caption]:
    """Every caption of the grammar, in a fixed order."""
    objects = [ObjectGroup(c, s) for c in COLORS for s in SHAPES]
    captions = [Caption("single", (o,)) for o in objects]
    captions += [Caption("count", (ObjectGroup(o.color, o.shape, n),)) for n in COUNT_WORDS for o in objects]
    pairs = [(a, b) for a in objects for b in objects if a.color != b.color]
    captions += [Caption("binding", pair) for pair in pairs]
    captions += [Caption("position", pair, Relation(rel)) for rel in RELATIONS for pair in pairs]
    return captions


def is_held_out(caption: Caption) -> bool:
    """The fixed split rule: about one compositional prompt in five is held out; single objects never are.

    Colour and shape indices are summed over the caption's objects (plus the count, or the relation's index); a
    caption is held out when that sum is divisible by 5. Every colour and shape therefore appears in training,
    while held-out prompts combine them in ways training never shows.
    """
    if caption.kind == "single":
        return False
    colors, shapes = list(COLORS), list(SHAPES)
    total = sum(colors.index(g.color) + shapes.index(g.shape) for g in caption.groups)
    if caption.kind == "count":
        total += caption.groups[0].count
    if caption.relation is not None:
        total += RELATIONS.index(caption.relation.relation)
    return total % 5 == 0


def split_prompts() -> tuple[list[str], list[str]]:
    """``(train, heldout)`` prompt lists, by :func:`is_held_out`."""
    captions = all_captions()
    train = [c.text for c in captions if not is_held_out(c)]
    heldout = [c.text for c in captions if is_held_out(c)]
    return train, heldout


def load_prompts(split: str) -> list[str]:
    """The shipped prompt file ``train`` or ``heldout``, one prompt a line."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout'; got {split!r}.")
    text = resources.files("diffrl.tiny").joinpath("prompts", f"{split}.txt").read_text()
    return [line for line in text.splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------------------------
# Rendering


@dataclass(frozen=True)
class PlacedObject:
    color: str
    shape: str
    center: tuple[float, float]  # (x, y) in pixels of the 64x64 image, y pointing down
    size: float  # side of the bounding box, pixels


def _draw(draw: ImageDraw.ImageDraw, obj: PlacedObject) -> None:
    k = SUPERSAMPLE
    cx, cy, half = obj.center[0] * k, obj.center[1] * k, obj.size * k / 2
    fill = COLORS[obj.color]
    if obj.shape == "circle":
        draw.ellipse((cx - half, cy - half, cx + half, cy + half), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
    else:  # upright isosceles triangle filling its bounding box
        draw.polygon(((cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)), fill=fill)


def draw_scene(objects: list[PlacedObject]) -> np.ndarray:
    """Draw placed objects: ``[64, 64, 3]`` uint8."""
    size = IMAGE_SIZE * SUPERSAMPLE
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        _draw(draw, obj)
    return np.asarray(image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX))


# Slots: where a scene's objects go, by how many there are and how they are arranged. Objects sit near a fixed
# layout (jittered by up to SLOT_JITTER pixels, sizes drawn from the slot's range), so what a scene shows is decided
# by which colour and shape fill which slot, not by where an object happens to land. A generative model of these
# scenes then makes its prompt-relevant choices globally and early, where a policy gradient can re-weight them.
SLOT_JITTER = 3.0
_SLOTS: dict[str, tuple[tuple[tuple[float, float], ...], tuple[float, float]]] = {
    "single": (((32.0, 32.0),), (24.0, 30.0)),
    "row": (((17.0, 32.0), (47.0, 32.0)), (18.0, 23.0)),
    "column": (((32.0, 17.0), (32.0, 47.0)), (18.0, 23.0)),
    "three": (((17.0, 19.0), (47.0, 19.0), (32.0, 47.0)), (16.0, 19.0)),
    "four": (((17.0, 17.0), (47.0, 17.0), (17.0, 47.0), (47.0, 47.0)), (16.0, 19.0)),
}
# the order of a position prompt's subject and reference along its axis
_RELATION_LAYOUT = {"left of": ("row", 0), "right of": ("row", 1), "above": ("column", 0), "below": ("column", 1)}


def place(caption: Caption, rng: random.Random) -> list[PlacedObject]:
    """Positions and sizes for a caption's objects: each in a slot of the layout its kind and count call for.

    One object: the centre. Two of a count, or a binding pair: a row, in random order. A position pair: a row for
    left of / right of, a column for above / below, the subject first or second as the relation says. Three or
    four of a count: a triangle or a two-by-two grid.
    """
    specs = [g for g in caption.groups for _ in range(g.count)]
    if caption.relation is not None:
        layout, subject_slot = _RELATION_LAYOUT[caption.relation.relation]
        subject = caption.groups[caption.relation.subject]
        reference = caption.groups[caption.relation.reference]
        specs = [subject, reference] if subject_slot == 0 else [reference, subject]
    elif len(specs) == 1:
        layout = "single"
    elif len(specs) == 2:
        layout = "row"
        rng.shuffle(specs)
    else:
        layout = "three" if len(specs) == 3 else "four"
    centers, (low, high) = _SLOTS[layout]
    objects = []
    for group, (x, y) in zip(specs, centers, strict=True):
        jitter_x, jitter_y = rng.uniform(-SLOT_JITTER, SLOT_JITTER), rng.uniform(-SLOT_JITTER, SLOT_JITTER)
        objects.append(PlacedObject(group.color, group.shape, (x + jitter_x, y + jitter_y), rng.uniform(low, high)))
    return objects


def render(prompt: str | Caption, seed: int) -> np.ndarray:
    """A scene that satisfies ``prompt``, deterministic from ``seed``: ``[64, 64, 3]`` uint8."""
    caption = parse(prompt) if isinstance(prompt, str) else prompt
    return draw_scene(place(caption, random.Random(seed)))


def captions_by_kind(prompts: list[str] | None = None) -> dict[str, list[Caption]]:
    """``prompts`` (default: the whole grammar) parsed and grouped by kind."""
    pool = [parse(p) for p in prompts] if prompts is not None else all_captions()
    by_kind = {kind: [c for c in pool if c.kind == kind] for kind in KINDS}
    return {kind: captions for kind, captions in by_kind.items() if captions}


def sample_caption(rng: random.Random, by_kind: dict[str, list[Caption]]) -> Caption:
    """A caption drawn kind-first (each kind in ``by_kind`` equally likely), then uniformly within its kind."""
    return rng.choice(by_kind[rng.choice(sorted(by_kind))])


# ---------------------------------------------------------------------------------------------------------------
# Loose captions: how the tiny models are taught to follow a prompt only partly


@dataclass(frozen=True)
class Looseness:
    """How loosely pretraining captions describe their scenes (see :func:`loose_caption`).

    ``attribute_noise`` is the probability that each attribute of a caption (each group's colour and shape, a count,
    a relation) names another value than the scene has; ``partial`` the share of two-object scenes captioned with
    one of their objects only; ``drop_color`` the share of captions with their colour words left out;
    ``mismatch`` the share of scenes captioned with another prompt altogether, so that a model follows a prompt or
    ignores it as a whole (a mode its prediction chooses, as guidance does) rather than attribute by attribute.
    The defaults are the shipped model's: half the scenes captioned exactly, the other half with another prompt.
    """

    attribute_noise: float = 0.0
    partial: float = 0.0
    drop_color: float = 0.0
    mismatch: float = 0.5

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"Looseness.{name} is a probability; give a value in [0, 1], not {value}.")


def _other(value: str | int, choices, rng: random.Random):
    return rng.choice([c for c in choices if c != value])


def perturb(caption: Caption, noise: float, rng: random.Random) -> Caption:
    """``caption`` with each attribute independently replaced, with probability ``noise``, by another value of its
    kind; two-object captions keep two different colours."""
    groups = []
    for group in caption.groups:
        color = _other(group.color, COLORS, rng) if rng.random() < noise else group.color
        shape = _other(group.shape, SHAPES, rng) if rng.random() < noise else group.shape
        count = _other(group.count, COUNT_WORDS, rng) if caption.kind == "count" and rng.random() < noise else None
        groups.append(ObjectGroup(color, shape, count or group.count))
    if len(groups) == 2 and groups[0].color == groups[1].color:
        groups[1] = ObjectGroup(_other(groups[0].color, COLORS, rng), groups[1].shape, groups[1].count)
    relation = caption.relation
    if relation is not None and rng.random() < noise:
        relation = Relation(_other(relation.relation, RELATIONS, rng), relation.subject, relation.reference)
    return Caption(caption.kind, tuple(groups), relation)


@functools.lru_cache(maxsize=4)
def _texts_by_kind(prompts: frozenset[str]) -> dict[str, list[str]]:
    return {kind: [c.text for c in captions] for kind, captions in captions_by_kind(sorted(prompts)).items()}


def loose_caption(scene: Caption, looseness: Looseness, rng: random.Random, allowed: set[str]) -> str:
    """The text a pretraining scene of ``scene`` is captioned with.

    0. With probability ``looseness.mismatch`` another prompt of ``allowed``, drawn as scenes are (kind first, then
       uniformly within its kind), so that every prompt is followed by about the same share of its captions.
    1. With probability ``looseness.partial`` a two-object scene is captioned with one of its objects ("a red
       circle" for a red circle left of a blue square): the model learns that a named object may come with others.
    2. Otherwise each attribute is perturbed (:func:`perturb`); a result outside ``allowed`` (the training prompts,
       so that held-out prompts are never seen, not even as a wrong caption) is drawn again, up to 20 times, and
       the exact caption used if none is allowed.
    3. With probability ``looseness.drop_color`` the colour words are then left out ("a circle and a square").
    """
    if looseness.mismatch and rng.random() < looseness.mismatch:
        by_kind = _texts_by_kind(frozenset(allowed))
        return rng.choice([text for text in by_kind[rng.choice(sorted(by_kind))] if text != scene.text])
    if len(scene.groups) == 2 and rng.random() < looseness.partial:
        text = caption_text(Caption("single", (scene.groups[rng.randrange(2)],)))
    else:
        text = scene.text
        for _ in range(20):
            candidate = perturb(scene, looseness.attribute_noise, rng).text
            if candidate in allowed:
                text = candidate
                break
    if rng.random() < looseness.drop_color:
        text = " ".join(word for word in text.split() if word not in COLORS)
    return text
