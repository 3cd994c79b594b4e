import pytest
import torch

from diffrl.config import FLUX_ATTENTION, LoraConfig, ModelConfig
from diffrl.evaluation import EvalResult, evaluate, noise_variance, paired_difference, step_leverage
from diffrl.policies.flux import FluxPolicy
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


def test_paired_difference_removes_what_the_pairs_share():
    base = torch.tensor([0.1, 0.9, 0.3, 0.7, 0.5])
    after = base + torch.tensor([0.02, 0.04, 0.02, 0.04, 0.03])  # a small, steady gain on widely spread scores
    gain, stderr = paired_difference(after, base)
    assert gain == pytest.approx(0.03)
    assert stderr == pytest.approx(0.01 / 5**0.5, rel=1e-4)  # std of the differences, not of the scores
    assert stderr < base.std().item() / 5**0.5 / 10
    with pytest.raises(ValueError, match="one length"):
        paired_difference(after, base[:4])


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


def test_noise_variance_splits_a_prompts_variance_by_where_the_noise_enters(random_sd_dir):
    policy = SDPolicy.load(ModelConfig(path=str(random_sd_dir)), LoraConfig())
    prompts = ["a red circle", "two blue squares"]
    kwargs = {"num_steps": 4, "guidance_scale": 2.0, "initial_noises": 2, "step_noises": 3}

    def mean_pixel(images, prompts, metadata):
        return images.mean(dim=(1, 2, 3))

    reward = weighted_sum({mean_pixel: 1.0})
    (ode,) = noise_variance(policy, prompts, reward, [None], eta=0.0, **kwargs)
    assert ode.step_var == 0.0 and ode.prompt_var > 0  # no step noise: images differ only by the initial noise
    window, full = noise_variance(policy, prompts, reward, [(0, 2), None], eta=1.2, **kwargs)
    assert window.sde_window == (0, 2) and window.step_var > 0 and full.step_var > 0

    # the arithmetic, on rewards 0..5 in sampling order: one prompt, 2 initial noises x 3 step noises
    def in_order(images, prompts, metadata):
        return torch.arange(len(images), dtype=torch.float32)

    (row,) = noise_variance(policy, prompts[:1], weighted_sum({in_order: 1.0}), [(0, 1)], eta=1.0, **kwargs)
    assert row.step_var == pytest.approx(1.0)  # var(0, 1, 2) = var(3, 4, 5) = 1
    assert row.prompt_var == pytest.approx(3.5)  # var(0..5)
    assert row.step_share == pytest.approx(1.0 / 3.5) and row.mean == pytest.approx(2.5)

    def dropped(images, prompts, metadata):
        return torch.full((len(images),), float("nan"))

    with pytest.raises(ValueError, match="dropped 6 of 6"):
        noise_variance(policy, prompts[:1], weighted_sum({dropped: 1.0}, on_invalid="drop"), [None], **kwargs)


def test_step_leverage_is_the_mean_slope_over_the_step_std(random_sd_dir, random_flux_dir):
    sd = SDPolicy.load(ModelConfig(path=str(random_sd_dir)), LoraConfig())
    leverage = step_leverage(sd, 5, eta=1.0)
    schedule, alphas = sd.schedule(5), sd.scheduler.alphas_cumprod.double()
    for i in range(4):  # DDPM posterior (eta = 1), its mean written in the predicted noise
        a_t, a_p = alphas[int(schedule.timesteps[i])], alphas[int(schedule.prev_timesteps[i])]
        x0_coef = a_p.sqrt() * (1 - a_t / a_p) / (1 - a_t)
        std = ((1 - a_p) / (1 - a_t) * (1 - a_t / a_p)).sqrt()
        assert leverage[i] == pytest.approx((x0_coef * (1 - a_t).sqrt() / a_t.sqrt() / std).item(), rel=1e-4)
    assert all(v == float("inf") for v in step_leverage(sd, 5, eta=0.0))  # ODE steps: nothing to train

    flux = FluxPolicy.load(
        ModelConfig(family="flux", path=str(random_flux_dir)), LoraConfig(target_modules=FLUX_ATTENTION)
    )
    leverage = step_leverage(flux, 6, eta=1.0)
    sigmas = flux.schedule(6).sigmas.double()
    for i in range(5):  # gDDIM-flow at eta = 1: the velocity's coefficient in the mean over the std
        t, s = sigmas[i], sigmas[i + 1]
        r = ((1 - t) * s / (t * (1 - s))) ** 2
        v_coef = s * r.sqrt() * (1 - t) - (1 - s) * t
        assert leverage[i] == pytest.approx((v_coef.abs() / (s * (1 - r).sqrt())).item(), rel=1e-4)
    assert leverage[-1] == float("inf")  # the last flow step (to sigma 0) has no noise
    assert leverage[0] < leverage[2] < leverage[4]  # a flow step's mean barely depends on the model at high noise
