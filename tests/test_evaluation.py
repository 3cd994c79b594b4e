import pytest
import torch

from diffrl.config import LoraConfig, ModelConfig
from diffrl.evaluation import EvalResult, evaluate
from diffrl.policies.sd import SDPolicy
from diffrl.rewards import weighted_sum


def test_gap_arithmetic_is_a_paired_difference():
    result = EvalResult(etas=[0.0, 1.0], num_steps=10, train_eta=1.0)
    result.scores["r"] = {0.0: torch.tensor([0.5, 0.7, 0.9]), 1.0: torch.tensor([0.4, 0.7, 0.6])}
    gap, stderr = result.gap("r")
    diffs = torch.tensor([0.1, 0.0, 0.3])
    assert gap == pytest.approx(diffs.mean().item())
    assert stderr == pytest.approx(diffs.std().item() / 3**0.5)
    metrics = result.to_metrics()
    ode_only = EvalResult(etas=[0.0], num_steps=10, train_eta=1.0, scores={"r": {0.0: torch.tensor([0.5])}})
    assert "eval/r/gap" not in ode_only.to_metrics()  # no SDE evaluated: no gap, no error
    assert metrics["eval/r/eta=0/mean"] == pytest.approx(0.7)
    assert metrics["eval/r/eta=1/mean"] == pytest.approx(17 / 30)
    assert metrics["eval/r/gap"] == pytest.approx(gap)


def test_evaluate_scores_every_eta_from_the_same_noise(random_sd_dir):
    policy = SDPolicy.load(ModelConfig(path=str(random_sd_dir)), LoraConfig())

    def mean_pixel(images, prompts, metadata):
        return images.mean(dim=(1, 2, 3))

    def first_pixel(images, prompts, metadata):
        return images[:, 0, 0, 0]

    images = {}
    result = evaluate(
        policy,
        ["a red circle", "a blue square", "three green triangles"],
        weighted_sum({mean_pixel: 1.0, first_pixel: 2.0}),
        etas=(0.0, 1.2),
        num_steps=4,
        guidance_scale=2.0,
        batch_size=2,
        images_out=images,
    )
    assert set(result.scores) == {"mean_pixel", "first_pixel", "total"}
    torch.testing.assert_close(result.scores["mean_pixel"][0.0], images[0.0].mean(dim=(1, 2, 3)))
    total = result.scores["total"][1.2]
    torch.testing.assert_close(total, result.scores["mean_pixel"][1.2] + 2 * result.scores["first_pixel"][1.2])
    assert result.train_eta == 1.2
    assert "eval/total/gap" in result.to_metrics()
    # the first prompt alone, with the same base seed, gets the same noise and so the same image
    again = evaluate(
        policy, ["a red circle"], weighted_sum({mean_pixel: 1.0}), etas=(0.0,), num_steps=4, guidance_scale=2.0
    )
    assert again.mean("mean_pixel", 0.0) == pytest.approx(images[0.0][0].mean().item(), abs=1e-6)
