import random

import numpy as np
import pytest

from diffrl.tiny.world import (
    COLORS,
    SHAPES,
    SLOT_JITTER,
    Caption,
    ObjectGroup,
    Relation,
    all_captions,
    captions_by_kind,
    is_held_out,
    load_prompts,
    parse,
    place,
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


def test_loose_captions_never_name_a_held_out_prompt_and_follow_their_rates():
    from collections import Counter

    from diffrl.tiny.world import Looseness, loose_caption

    train, heldout = split_prompts()
    allowed = set(train)
    by_kind = captions_by_kind(train)
    rng = random.Random(0)
    exact, total, dropped, partial = Counter(), Counter(), 0, 0
    looseness = Looseness(attribute_noise=0.4, partial=0.1, drop_color=0.1, mismatch=0.0)
    for _ in range(4000):
        scene = sample_caption(rng, by_kind)
        text = loose_caption(scene, looseness, rng, allowed)
        assert text not in heldout
        total[scene.kind] += 1
        exact[scene.kind] += text == scene.text
        dropped += not any(word in COLORS for word in text.split())
        partial += len(scene.groups) == 2 and len(text.split()) <= 3
    # each attribute stays with probability 0.6 (a single object has 2, a position prompt 5), times 0.9 kept colours
    assert 0.9 * 0.6**2 - 0.05 < exact["single"] / total["single"] < 0.9 * 0.6**2 + 0.08
    assert (
        exact["position"] / total["position"] < exact["binding"] / total["binding"] < exact["count"] / total["count"]
    )
    assert 0.07 < dropped / 4000 < 0.13
    assert 0.03 < partial / 4000 < 0.08  # half the scenes have two objects, a tenth of those are named in part


def test_mismatched_captions_name_another_prompt_drawn_as_scenes_are():
    from collections import Counter

    from diffrl.tiny.world import Looseness, loose_caption

    train, _ = split_prompts()
    allowed, by_kind = set(train), captions_by_kind(train)
    rng = random.Random(3)
    looseness = Looseness(attribute_noise=0.0, drop_color=0.0, mismatch=0.5)
    followed, caption_kinds = Counter(), Counter()
    for _ in range(4000):
        scene = sample_caption(rng, by_kind)
        text = loose_caption(scene, looseness, rng, allowed)
        assert text in allowed
        followed[scene.kind] += text == scene.text
        caption_kinds[parse(text).kind] += 1
    # every kind is followed by about half its captions, and the captions' kinds stay as even as the scenes'
    for kind in by_kind:
        assert 0.42 < followed[kind] / 1000 < 0.58, (kind, followed)
        assert 850 < caption_kinds[kind] < 1150, caption_kinds
    # with no mismatch a caption is exact whenever nothing else perturbs it
    exact = Looseness(attribute_noise=0.0, drop_color=0.0, mismatch=0.0)
    assert all(loose_caption(c, exact, rng, allowed) == c.text for c in all_captions() if c.text in allowed)


def test_looseness_rates_must_be_probabilities():
    from diffrl.tiny.world import Looseness

    with pytest.raises(ValueError, match=r"mismatch is a probability; give a value in \[0, 1\], not 1.5"):
        Looseness(mismatch=1.5)


def test_perturbed_captions_keep_two_distinct_colours_and_their_kind():
    from diffrl.tiny.world import perturb

    rng = random.Random(1)
    for caption in all_captions():
        for _ in range(3):
            changed = perturb(caption, 0.9, rng)
            assert changed.kind == caption.kind and len(changed.groups) == len(caption.groups)
            assert len({g.color for g in changed.groups}) == len(changed.groups)
            assert parse(changed.text) == changed
    assert perturb(parse("a red circle left of a blue square"), 0.0, rng).text == "a red circle left of a blue square"


def _apart(a, b, gap: float) -> bool:
    """Two placed objects' bounding boxes are at least ``gap`` pixels apart along some axis."""
    reach = (a.size + b.size) / 2 + gap
    return abs(a.center[0] - b.center[0]) >= reach or abs(a.center[1] - b.center[1]) >= reach


def test_scenes_put_every_object_in_its_slot_apart_and_inside_the_canvas():
    for caption in all_captions():
        for seed in range(3):
            objects = place(caption, random.Random(seed))
            assert len(objects) == sum(g.count for g in caption.groups)
            assert sorted((o.color, o.shape) for o in objects) == sorted(
                (g.color, g.shape) for g in caption.groups for _ in range(g.count)
            )
            for i, a in enumerate(objects):
                assert a.size / 2 <= min(a.center) and max(a.center) <= 64 - a.size / 2
                assert all(_apart(a, b, gap=2.0) for b in objects[i + 1 :])
            if len(objects) == 1:
                assert max(abs(c - 32) for c in objects[0].center) <= SLOT_JITTER


@pytest.mark.parametrize(
    ("prompt", "axis", "subject_first"),
    [
        ("a red square left of a blue circle", 0, True),
        ("a red square right of a blue circle", 0, False),
        ("a red square above a blue circle", 1, True),
        ("a red square below a blue circle", 1, False),
    ],
)
def test_position_scenes_lay_the_pair_along_the_relation_s_axis(prompt, axis, subject_first):
    for seed in range(10):
        subject, reference = sorted(place(parse(prompt), random.Random(seed)), key=lambda o: o.color != "red")
        assert (subject.center[axis] < reference.center[axis]) == subject_first
        assert abs(subject.center[axis] - reference.center[axis]) > 20
        assert abs(subject.center[1 - axis] - reference.center[1 - axis]) <= 6


def test_binding_pairs_take_either_order():
    caption = parse("a red square and a blue circle")
    first = {place(caption, random.Random(seed))[0].color for seed in range(20)}
    assert first == {"red", "blue"}
