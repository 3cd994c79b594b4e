import numpy as np
import pytest
import torch

from diffrl.rewards.shapes import detect, shapes, shapes_strict, verify
from diffrl.tiny.verifier_check import check_verifier
from diffrl.tiny.world import BACKGROUND, PlacedObject, draw_scene, parse, render


def as_batch(*images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0


def test_detects_colour_shape_and_position():
    scene = draw_scene(
        [
            PlacedObject("red", "square", (15.0, 30.0), 16.0),
            PlacedObject("blue", "circle", (45.0, 30.0), 16.0),
            PlacedObject("green", "triangle", (30.0, 52.0), 14.0),
        ]
    )
    found = sorted(detect(scene), key=lambda o: o.centroid[0])
    assert [(o.color, o.shape) for o in found] == [("red", "square"), ("green", "triangle"), ("blue", "circle")]
    assert found[0].centroid[0] == pytest.approx(15.0, abs=1.0)


def test_partial_credit_is_the_fraction_of_constraints():
    scene = draw_scene([PlacedObject("red", "square", (20.0, 30.0), 16.0)])
    # "a red circle": red present (yes), one red (yes), red is circle (no), nothing else (yes) -> 3 / 4
    assert verify(scene, parse("a red circle")).score == pytest.approx(0.75)
    # "two red squares": present, count (no), shape, nothing else -> 3 / 4
    assert verify(scene, parse("two red squares")).score == pytest.approx(0.75)
    # "a red square right of a blue circle": 3 red + 0 blue of 3 + relation (no) + nothing else -> 4 / 8
    assert verify(scene, parse("a red square right of a blue circle")).score == pytest.approx(0.5)
    empty = np.full((64, 64, 3), BACKGROUND, dtype=np.uint8)
    assert verify(empty, parse("a red circle")).score == pytest.approx(0.25)  # only "nothing else" holds


def test_each_constraint_carries_its_kind():
    scene = draw_scene([PlacedObject("red", "square", (20.0, 30.0), 16.0)])
    verdict = verify(scene, parse("a red square right of a blue circle"))
    assert verdict.kinds == ("present", "count", "shape", "present", "count", "shape", "relation", "nothing else")
    missed = [kind for kind, (_, ok) in zip(verdict.kinds, verdict.constraints, strict=True) if not ok]
    assert missed == ["present", "count", "shape", "relation"]


def test_reward_callables_score_a_batch():
    prompts = ["a red circle", "three blue squares", "a green triangle above a yellow circle"]
    images = as_batch(*(render(p, seed=i) for i, p in enumerate(prompts)))
    torch.testing.assert_close(shapes(images, prompts, [{}] * 3), torch.ones(3))
    wrong = ["a red square", "two blue squares", "a green triangle below a yellow circle"]
    scores = shapes(images, wrong, [{}] * 3)
    assert (scores < 1).all() and (scores > 0).all()
    torch.testing.assert_close(shapes_strict(images, wrong, [{}] * 3), torch.zeros(3))


def test_reward_rejects_bad_input():
    with pytest.raises(ValueError, match=r"expects images \[B, 3, H, W\]"):
        shapes(torch.zeros(2, 64, 64, 3), ["a red circle"] * 2)
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        shapes(torch.zeros(2, 3, 64, 64), ["a red circle"])
    with pytest.raises(ValueError, match="not a prompt of the shapes grammar"):
        shapes(torch.zeros(1, 3, 64, 64), ["a photo of a cat"])


@pytest.mark.parametrize(("blur", "noise"), [(0.0, 0.0), (0.8, 0.0), (0.0, 8.0), (0.8, 8.0)])
def test_verifier_accuracy_on_a_fixed_sample(blur, noise):
    check = check_verifier(n=150, seed=11, blur_radius=blur, noise_std=noise)
    assert check.mean_score >= 0.98
    assert check.mismatched_full_marks <= 0.02
