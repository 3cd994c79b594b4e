import pytest
import torch

from diffrl.config import FLUX_ATTENTION, Config, LoraConfig, ModelConfig, apply_overrides
from diffrl.evaluation import (
    ODE,
    EvalResult,
    Sampler,
    evaluate,
    gradient_signal_and_noise,
    noise_variance,
    paired_difference,
    rescale_window,
    run_samplers,
    step_leverage,
    training_sampler,
)
from diffrl.policies.flux import FluxPolicy
from diffrl.policies.sd import SDPolicy
from diffrl.rewards import weighted_sum


def test_gap_arithmetic_is_a_paired_difference():
    train = Sampler("train_sampler", 1.0, (0, 2), 10)
    result = EvalResult(samplers=[ODE, train, Sampler.every_step(1.5)], num_steps=10)
    result.scores["r"] = {
        "ode": torch.tensor([0.5, 0.7, 0.9]),
        "train_sampler": torch.tensor([0.4, 0.7, 0.6]),
        "sde_eta=1.5": torch.tensor([0.5, 0.5, 0.5]),
    }
    gap, stderr = result.gap("r")
    diffs = torch.tensor([0.1, 0.0, 0.3])
    assert gap == pytest.approx(diffs.mean().item())
    assert stderr == pytest.approx(diffs.std().item() / 3**0.5)
    metrics = result.to_metrics()
    ode_only = EvalResult(samplers=[ODE], num_steps=10, scores={"r": {"ode": torch.tensor([0.5])}})
    assert "eval/r/gap" not in ode_only.to_metrics()  # no SDE evaluated: no gap, no error
    assert metrics["eval/r/ode/mean"] == pytest.approx(0.7)
    assert metrics["eval/r/train_sampler/mean"] == pytest.approx(17 / 30)
    assert metrics["eval/r/gap"] == pytest.approx(gap)  # the gap is to the sampler that trained
    assert metrics["eval/r/gap_sde_eta=1.5"] == pytest.approx(0.2)  # the every-step extra has a gap of its own


def test_the_training_sampler_is_the_runs_eta_and_window_at_that_epoch():
    config = apply_overrides(
        Config(),
        ["--sample.eta", "1.2", "--sample.num_steps", "20", "--sample.sde_window", "0,2", "--sample.window_stride",
         "2", "--sample.window_shift_every", "3", "--eval.sde_etas", "1.2,2"],
    )  # fmt: skip
    base = training_sampler(config, 0)
    assert (base.eta, base.sde_window, base.window_steps) == (1.2, (0, 2), 20)
    assert training_sampler(config, 3).sde_window == (0, 2)  # epochs 0-2 trained on the first position
    assert training_sampler(config, 4).sde_window == (2, 4)  # epoch 3 moved it
    assert training_sampler(config, 10_000).sde_window == (18, 20)
    assert base.window_at(10) == (0, 1) and training_sampler(config, 4).window_at(10) == (1, 2)
    assert base.describe(20) == "training sampler: eta 1.2, stochastic steps 0-2 of 20"
    # a window trains on part of the trajectory: every-step SDE at the same eta is a different sampler, kept
    assert [s.label for s in run_samplers(config)] == ["ode", "train_sampler", "sde_eta=1.2", "sde_eta=2"]
    every = apply_overrides(Config(), ["--sample.eta", "1.2", "--eval.sde_etas", "1.2,2"])
    assert [s.label for s in run_samplers(every)] == ["ode", "train_sampler", "sde_eta=2"]  # not twice the same


def test_rescale_window_keeps_the_span_and_at_least_one_step():
    assert rescale_window((0, 1), 20, 10) == (0, 1)
    assert rescale_window((4, 8), 20, 10) == (2, 4)
    assert rescale_window((19, 20), 20, 5) == (4, 5)
    assert rescale_window((0, 2), 10, 20) == (0, 4)
    assert rescale_window(None, 20, 10) is None and rescale_window((3, 5), 20, 20) == (3, 5)


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
        samplers=(ODE, Sampler("train_sampler", 1.2, (0, 2), 4), Sampler.every_step(1.2)),
        num_steps=4,
        guidance_scale=2.0,
        batch_size=2,
        images_out=images,
    )
    assert set(result.scores) == {"mean_pixel", "first_pixel", "total"}
    torch.testing.assert_close(result.scores["mean_pixel"]["ode"], images["ode"].mean(dim=(1, 2, 3)))
    for label in ("train_sampler", "sde_eta=1.2"):
        total = result.scores["total"][label]
        parts = result.scores["mean_pixel"][label] + 2 * result.scores["first_pixel"][label]
        torch.testing.assert_close(total, parts)
    assert {"eval/total/gap", "eval/total/gap_sde_eta=1.2"} <= set(result.to_metrics())
    # the window leaves the last two steps deterministic: its images differ from every-step SDE at the same eta
    assert not torch.allclose(images["train_sampler"], images["sde_eta=1.2"])
    # the first prompt alone, with the same base seed, gets the same noise and so the same image
    again = evaluate(
        policy, ["a red circle"], weighted_sum({mean_pixel: 1.0}), samplers=(ODE,), num_steps=4, guidance_scale=2.0
    )
    assert again.mean("mean_pixel", "ode") == pytest.approx(images["ode"][0].mean().item(), abs=1e-6)


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


def test_gradient_signal_and_noise_recovers_a_known_signal_to_noise():
    generator = torch.Generator().manual_seed(0)
    signal = torch.zeros(2000)
    signal[:100] = 0.3  # |S|^2 = 9
    noise = torch.randn(400, 2000, generator=generator) * 0.2  # E|N|^2 = 80
    estimate, residual = gradient_signal_and_noise(signal + noise)
    assert estimate == pytest.approx(9.0, abs=0.6) and residual == pytest.approx(80.0, rel=0.02)
    # pure noise: no signal, whatever the noise's size
    estimate, residual = gradient_signal_and_noise(noise * 10)
    assert abs(estimate) < 1e-3 * residual
    with pytest.raises(ValueError, match=r"\[n >= 2, P\]"):
        gradient_signal_and_noise(signal[None])
