import itertools
import math

import pytest
import torch
from diffusers import DDIMScheduler

from diffrl.sampling.gddim import gddim_step, max_ddim_eta

SD_SCHEDULE = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False}


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make_scheduler(prediction_type="epsilon", timestep_spacing="leading", set_alpha_to_one=False, steps=50):
    scheduler = DDIMScheduler(
        **SD_SCHEDULE,
        prediction_type=prediction_type,
        timestep_spacing=timestep_spacing,
        set_alpha_to_one=set_alpha_to_one,
        steps_offset=1 if timestep_spacing == "leading" else 0,
    )
    scheduler.set_timesteps(steps)
    return scheduler


def run_step(scheduler, model_output, t, sample, eta, seed=None, **kwargs):
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    return gddim_step(
        model_output,
        t,
        sample,
        alphas_cumprod=scheduler.alphas_cumprod,
        prev_timestep=prev_t,
        final_alpha_cumprod=scheduler.final_alpha_cumprod,
        prediction_type=scheduler.config.prediction_type,
        eta=eta,
        generator=None if seed is None else torch.Generator().manual_seed(seed),
        **kwargs,
    )


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("timestep_spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [50, 10])
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
@pytest.mark.parametrize(("eta", "noise_schedule"), [(0.0, "gddim"), (1.0, "gddim"), (0.3, "ddim"), (0.7, "ddim")])
def test_matches_diffusers_ddim_step(prediction_type, timestep_spacing, steps, set_alpha_to_one, eta, noise_schedule):
    scheduler = make_scheduler(prediction_type, timestep_spacing, set_alpha_to_one, steps)
    gen = torch.Generator().manual_seed(0)
    for i, t in enumerate(scheduler.timesteps):
        sample = torch.randn(2, 4, 8, 8, generator=gen)
        model_output = torch.randn(2, 4, 8, 8, generator=gen)
        expected = scheduler.step(
            model_output, t, sample, eta=eta, generator=torch.Generator().manual_seed(i)
        ).prev_sample
        ours = run_step(scheduler, model_output, int(t), sample, eta, seed=i, noise_schedule=noise_schedule)
        assert rel_error(ours.prev_sample, expected) <= 1e-6, f"step {i} (t={int(t)})"


def test_sample_prediction_is_converted_to_x0_and_eps():
    scheduler = make_scheduler("sample", steps=10)
    sample, model_output = torch.randn(2, 2, 4, 4), torch.randn(2, 2, 4, 4)
    t = int(scheduler.timesteps[3])
    expected = scheduler.step(model_output, t, sample, eta=0.0).prev_sample
    assert rel_error(run_step(scheduler, model_output, t, sample, 0.0).prev_sample, expected) <= 1e-6


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("eta", [0.5, 1.0, 2.0])
def test_log_prob_is_the_gaussian_density(reduction, eta):
    scheduler = make_scheduler(steps=20)
    sample, model_output = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    out = run_step(
        scheduler, model_output, int(scheduler.timesteps[5]), sample, eta, seed=1, log_prob_reduction=reduction
    )
    reference = torch.distributions.Normal(out.mean, out.std).log_prob(out.prev_sample)
    reference = reference.mean(dim=(1, 2, 3)) if reduction == "mean" else reference.sum(dim=(1, 2, 3))
    assert out.log_prob.shape == (3,)
    torch.testing.assert_close(out.log_prob, reference, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rescoring_a_stored_step_gives_the_same_log_prob_bitwise(dtype):
    scheduler = make_scheduler(steps=20)
    sample = torch.randn(4, 4, 8, 8).to(dtype)
    model_output = torch.randn(4, 4, 8, 8).to(dtype)
    t = int(scheduler.timesteps[7])
    sampled = run_step(scheduler, model_output, t, sample, 1.0, seed=3)
    rescored = run_step(scheduler, model_output, t, sample, 1.0, prev_sample=sampled.prev_sample)
    assert sampled.prev_sample.dtype == dtype
    assert sampled.mean.dtype == torch.float32 and sampled.log_prob.dtype == torch.float32
    assert torch.equal(rescored.prev_sample, sampled.prev_sample)
    assert torch.equal(rescored.log_prob, sampled.log_prob)
    assert torch.equal(torch.exp(rescored.log_prob - sampled.log_prob), torch.ones(4))


def test_eta_one_has_exactly_the_ddpm_posterior_variance():
    scheduler = make_scheduler(steps=50)
    ac = scheduler.alphas_cumprod.double()
    sample, model_output = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    for t in scheduler.timesteps.tolist()[:-1]:
        prev_t = t - 20
        out = run_step(scheduler, model_output, t, sample, 1.0, seed=0)
        a_t, a_p = ac[t], ac[prev_t]
        posterior_variance = (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
        assert out.std.double().item() ** 2 == pytest.approx(posterior_variance.item(), rel=1e-5)


@pytest.mark.parametrize("eta", [1.2, 2.0, 5.0, 20.0])
def test_large_eta_stays_finite_and_below_one_minus_alpha_prev(eta):
    scheduler = make_scheduler(steps=50)
    ac = scheduler.alphas_cumprod
    sample, model_output = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    for i, t in enumerate(scheduler.timesteps.tolist()):
        prev_t = t - 20
        a_p = ac[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod
        out = run_step(scheduler, model_output, t, sample, eta, seed=i)
        assert torch.isfinite(out.prev_sample).all() and torch.isfinite(out.mean).all()
        assert out.log_prob is not None and torch.isfinite(out.log_prob).all()
        # sigma^2 < 1 - a_p mathematically; in float32 r ** (eta^2) underflows to 0 for large eta, so allow rounding
        assert out.std.double().max().item() ** 2 <= (1 - a_p).item() * (1 + 1e-6)
        assert ((out.mean - a_p.sqrt() * out.pred_original_sample) * model_output >= -1e-6).all()


def test_mean_tends_to_scaled_x0_as_eta_grows():
    scheduler = make_scheduler(steps=50)
    sample, model_output = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    t = int(scheduler.timesteps[25])
    a_p = scheduler.alphas_cumprod[t - 20]
    distances = []
    for eta in [0.0, 1.0, 2.0, 5.0, 20.0]:
        out = run_step(scheduler, model_output, t, sample, eta, seed=0)
        distances.append((out.mean - a_p.sqrt() * out.pred_original_sample).norm().item())
    assert all(a > b for a, b in itertools.pairwise(distances))
    assert distances[-1] < 1e-6 * distances[0]


def test_deterministic_steps_have_no_log_prob():
    scheduler = make_scheduler(steps=10, set_alpha_to_one=True)
    sample, model_output = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    assert run_step(scheduler, model_output, int(scheduler.timesteps[0]), sample, 0.0).log_prob is None
    # final step to a_p = 1: sigma = 0 whatever eta is
    final = run_step(scheduler, model_output, int(scheduler.timesteps[-1]), sample, 1.5, seed=0)
    assert final.log_prob is None and torch.equal(final.std, torch.zeros_like(final.std))
    assert torch.isfinite(final.prev_sample).all()


def test_classic_ddim_past_its_range_raises_naming_the_largest_eta():
    scheduler = make_scheduler(steps=10)
    sample, model_output = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    t = int(scheduler.timesteps[0])
    a_t, a_p = scheduler.alphas_cumprod[t], scheduler.alphas_cumprod[t - 100]
    largest = max_ddim_eta(a_t, a_p).item()
    assert 1.0 < largest < 2.0
    run_step(scheduler, model_output, t, sample, largest * 0.99, seed=0, noise_schedule="ddim")
    with pytest.raises(ValueError, match=f"eta must be below {largest:.4f}"):
        run_step(scheduler, model_output, t, sample, largest * 1.01, seed=0, noise_schedule="ddim")
    # gDDIM takes the same eta without complaint
    assert run_step(scheduler, model_output, t, sample, largest * 1.01, seed=0).log_prob is not None


@pytest.mark.parametrize(
    ("eta", "message"),
    [
        (-0.1, "eta must be a finite number >= 0"),
        (math.nan, "eta must be a finite number >= 0"),
        (math.inf, "eta must be a finite number >= 0"),
        (1e155, "eta\\^2 overflows"),
        (1e300, "eta\\^2 overflows"),
    ],
)
def test_bad_eta_is_rejected(eta, message):
    scheduler = make_scheduler(steps=10)
    with pytest.raises(ValueError, match=message):
        run_step(scheduler, torch.randn(1, 4, 4, 4), 501, torch.randn(1, 4, 4, 4), eta)


def test_bad_arguments_are_rejected():
    scheduler = make_scheduler(steps=10)
    x = torch.randn(1, 4, 4, 4)
    with pytest.raises(ValueError, match="noise_schedule must be one of"):
        run_step(scheduler, x, 501, x, 1.0, noise_schedule="ddpm")
    with pytest.raises(ValueError, match="log_prob_reduction must be one of"):
        run_step(scheduler, x, 501, x, 1.0, log_prob_reduction="max")
    with pytest.raises(ValueError, match="prev_sample has shape"):
        run_step(scheduler, x, 501, x, 1.0, prev_sample=torch.randn(1, 4, 4, 5))
    with pytest.raises(ValueError, match="less noisy"):
        gddim_step(x, 100, x, alphas_cumprod=scheduler.alphas_cumprod, prev_timestep=200, eta=1.0)


def test_per_sample_timesteps_match_separate_calls():
    scheduler = make_scheduler(steps=50)
    ac = scheduler.alphas_cumprod
    sample, model_output = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    timesteps = torch.tensor([981, 501, 21])
    batched = gddim_step(
        model_output,
        timesteps,
        sample,
        alphas_cumprod=ac,
        prev_timestep=timesteps - 20,
        eta=1.3,
        prev_sample=sample * 0.9,
    )
    for i, t in enumerate(timesteps.tolist()):
        single = gddim_step(
            model_output[i : i + 1],
            t,
            sample[i : i + 1],
            alphas_cumprod=ac,
            prev_timestep=t - 20,
            eta=1.3,
            prev_sample=sample[i : i + 1] * 0.9,
        )
        torch.testing.assert_close(batched.log_prob[i : i + 1], single.log_prob)
        torch.testing.assert_close(batched.mean[i : i + 1], single.mean)


def test_a_batch_mixing_deterministic_and_stochastic_steps_raises():
    scheduler = make_scheduler(steps=10, set_alpha_to_one=True)
    x = torch.randn(2, 4, 4, 4)
    with pytest.raises(ValueError, match="mixes deterministic"):
        gddim_step(
            x,
            torch.tensor([1, 501]),
            x,
            alphas_cumprod=scheduler.alphas_cumprod,
            prev_timestep=torch.tensor([-99, 401]),
            eta=1.0,
        )


@pytest.mark.parametrize("eta", [0.001, 0.003, 0.01, 0.1])
def test_small_eta_std_matches_the_float64_formula_on_a_fine_grid(eta):
    """1 - r^(eta^2) cancels in float32 at small eta (18% std error at eta 0.003 on 1,000 steps); expm1 does not."""
    scheduler = make_scheduler(steps=1000, timestep_spacing="trailing")
    alphas = scheduler.alphas_cumprod.double()
    x = torch.randn(1, 4, 4, 4)
    worst = 0.0
    for t in scheduler.timesteps[:-1].tolist():
        prev_t = t - 1
        a_t, a_p = alphas[t], alphas[prev_t]
        r = a_t * (1 - a_p) / ((1 - a_t) * a_p)
        expected = ((1 - a_p) * (1 - r ** (eta**2))).sqrt().item()
        out = gddim_step(x, t, x, alphas_cumprod=scheduler.alphas_cumprod, prev_timestep=prev_t, eta=eta)
        worst = max(worst, abs(out.std.max().item() - expected) / expected)
    assert worst < 1e-5


def test_a_very_large_but_finite_eta_re_noises_fully():
    scheduler = make_scheduler(steps=10)
    x, eps = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    out = run_step(scheduler, eps, 501, x, 1e100, seed=0)
    a_p = scheduler.alphas_cumprod[401]
    assert out.std.max().item() == pytest.approx((1 - a_p).sqrt().item(), rel=1e-6)
    torch.testing.assert_close(out.mean, a_p.sqrt() * out.pred_original_sample)
