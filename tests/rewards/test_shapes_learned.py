"""The shipped learned shapes reward: small, differentiable, and it tells a prompt's scene from another's."""

import pytest
import torch

from diffrl.rewards import build_reward
from diffrl.rewards.shapes import shapes
from diffrl.rewards.shapes_learned import SHIPPED, LearnedShapesReward, tokenize
from diffrl.tiny.world import load_prompts, render


def scenes(prompts: list[str], seed: int) -> torch.Tensor:
    return (
        torch.stack([torch.from_numpy(render(p, seed + i).copy()) for i, p in enumerate(prompts)])
        .permute(0, 3, 1, 2)
        .float()
        / 255
    )


def test_the_shipped_scorer_is_small_and_registered():
    assert (SHIPPED / "model.safetensors").stat().st_size <= 5 * 2**20
    reward = build_reward("shapes_learned")
    scores = reward(scenes(["a red circle", "two blue squares"], 0), ["a red circle", "two blue squares"], [{}, {}])
    assert scores.shape == (2,) and bool(((scores >= 0) & (scores <= 1)).all())


def test_it_has_gradients_to_the_image_at_any_resolution():
    reward = LearnedShapesReward()
    images = torch.rand(2, 3, 128, 128, requires_grad=True)
    reward(images, ["a red circle", "a green square left of a yellow circle"]).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_held_out_scenes_score_above_scenes_of_other_prompts():
    prompts = load_prompts("heldout")[::12][:16]
    own = scenes(prompts, 100)
    others = scenes(prompts[1:] + prompts[:1], 200)  # each prompt paired with its neighbour's scene
    reward = LearnedShapesReward()
    with torch.no_grad():
        right, wrong = reward(own, prompts), reward(others, prompts)
    verifier_gap = (shapes(own, prompts) - shapes(others, prompts)).mean()
    assert verifier_gap > 0.3  # the pairs do differ, by the verifier
    assert (right - wrong).mean() > 0.5 * verifier_gap


def test_words_outside_the_grammar_and_long_prompts_still_tokenize():
    ids = tokenize(["a red circle", "a wobbly red circle " * 5])
    assert ids.shape == (2, 12) and ids[0, 3:].eq(0).all() and (ids[1] == 1).any()


def test_a_missing_scorer_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_shapes_scorer.py"):
        LearnedShapesReward(tmp_path)
