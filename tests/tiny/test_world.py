import random

import numpy as np
import pytest

from diffrl.tiny.world import (
    COLORS,
    SHAPES,
    Caption,
    ObjectGroup,
    Relation,
    all_captions,
    captions_by_kind,
    is_held_out,
    load_prompts,
    parse,
    render,
    sample_caption,
    split_prompts,
)


def test_render_is_deterministic_from_the_seed():
    a = render("a red square left of a blue circle", seed=7)
    b = render("a red square left of a blue circle", seed=7)
    c = render("a red square left of a blue circle", seed=8)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_sampling_captions_is_deterministic_from_the_seed():
    by_kind = captions_by_kind()
    first = [sample_caption(random.Random(3), by_kind) for _ in range(5)]
    again = [sample_caption(random.Random(3), by_kind) for _ in range(5)]
    assert first == again


def test_every_caption_round_trips_through_parse():
    captions = all_captions()
    assert len(captions) == len(set(captions)) == 960
    for caption in captions:
        assert parse(caption.text) == caption


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a red circle", Caption("single", (ObjectGroup("red", "circle"),))),
        ("three blue squares", Caption("count", (ObjectGroup("blue", "square", 3),))),
        (
            "a green triangle and a yellow circle",
            Caption("binding", (ObjectGroup("green", "triangle"), ObjectGroup("yellow", "circle"))),
        ),
        (
            "a red square left of a blue circle",
            Caption("position", (ObjectGroup("red", "square"), ObjectGroup("blue", "circle")), Relation("left of")),
        ),
        (
            "  A Purple Triangle BELOW a green square ",
            Caption(
                "position", (ObjectGroup("purple", "triangle"), ObjectGroup("green", "square")), Relation("below")
            ),
        ),
    ],
)
def test_parse_gives_the_constraints(prompt, expected):
    assert parse(prompt) == expected


@pytest.mark.parametrize(
    "prompt",
    [
        "",
        "a dog",
        "a red hexagon",
        "five red circles",
        "two red circle",
        "a red circle and a red square",  # two-object prompts name two different colours
        "a red circle near a blue square",
        "a red circle and a blue square and a green triangle",
        "one red circle",
    ],
)
def test_prompts_outside_the_grammar_are_a_clear_error(prompt):
    with pytest.raises(ValueError, match="is not a prompt of the shapes grammar"):
        parse(prompt)


def test_shipped_prompt_files_are_the_fixed_split():
    train, heldout = split_prompts()
    assert load_prompts("train") == train
    assert load_prompts("heldout") == heldout
    assert not set(train) & set(heldout)
    assert len(train) + len(heldout) == 960


def test_held_out_prompts_are_unseen_combinations_of_seen_atoms():
    train = [parse(p) for p in load_prompts("train")]
    heldout = [parse(p) for p in load_prompts("heldout")]
    assert all(is_held_out(c) for c in heldout) and not any(is_held_out(c) for c in train)
    assert {c.kind for c in heldout} == {"count", "binding", "position"}
    seen = {(g.color, g.shape) for c in train for g in c.groups}
    assert seen == {(c, s) for c in COLORS for s in SHAPES}
    assert 0.15 < len(heldout) / 960 < 0.25


def test_bad_split_name_is_rejected():
    with pytest.raises(ValueError, match="split must be"):
        load_prompts("test")
