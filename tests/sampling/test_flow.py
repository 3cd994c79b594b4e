import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from diffrl.sampling.flow import flow_step


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make_scheduler(steps: int, **config) -> FlowMatchEulerDiscreteScheduler:
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    if config.get("use_dynamic_shifting"):
        scheduler.set_timesteps(steps, mu=0.8)
    else:
        scheduler.set_timesteps(steps)
    return scheduler


SCHEDULER_CONFIGS = [
    {"shift": 1.0},
    {"shift": 3.0},
    {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15},  # FLUX.1's resolution-dependent shift
]


@pytest.mark.parametrize("config", SCHEDULER_CONFIGS)
@pytest.mark.parametrize("steps", [28, 10])
@pytest.mark.parametrize("shape", [(2, 16, 8), (2, 4, 8, 8)])
def test_eta_zero_matches_diffusers_flow_match_euler(config, steps, shape):
    scheduler = make_scheduler(steps, **config)
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(*shape, generator=gen)
    ours = sample.clone()
    for i, t in enumerate(scheduler.timesteps):
        model_output = torch.randn(*shape, generator=gen)
        sample = scheduler.step(model_output, t, sample).prev_sample
        out = flow_step(model_output, scheduler.sigmas[i], scheduler.sigmas[i + 1], ours, eta=0.0)
        assert out.log_prob is None
        assert rel_error(out.prev_sample, sample) <= 1e-6, f"step {i}"
        ours = sample  # compare each step from the same input


@pytest.mark.parametrize("steps", [10, 4])
def test_infinite_eta_is_diffusers_stochastic_sampling(steps):
    """eta -> inf re-noises x0 completely: diffusers' ``stochastic_sampling=True`` step, (1 - s) x0 + s z."""
    scheduler = make_scheduler(steps, stochastic_sampling=True, shift=3.0)
    gen = torch.Generator().manual_seed(1)
    for i, t in enumerate(scheduler.timesteps[:-1]):
        sample, model_output = torch.randn(2, 16, 8, generator=gen), torch.randn(2, 16, 8, generator=gen)
        expected = scheduler.step(model_output, t, sample, generator=torch.Generator().manual_seed(i)).prev_sample
        ours = flow_step(
            model_output,
            scheduler.sigmas[i],
            scheduler.sigmas[i + 1],
            sample,
            eta=60.0,
            generator=torch.Generator().manual_seed(i),
        )
        assert rel_error(ours.prev_sample, expected) <= 1e-6, f"step {i}"


@pytest.mark.parametrize("noise_schedule", ["gddim", "flow_grpo"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_log_prob_is_the_gaussian_density(noise_schedule, reduction):
    sample, model_output = torch.randn(3, 16, 8), torch.randn(3, 16, 8)
    out = flow_step(
        model_output,
        0.7,
        0.6,
        sample,
        eta=0.9,
        noise_schedule=noise_schedule,
        generator=torch.Generator().manual_seed(0),
        log_prob_reduction=reduction,
    )
    reference = torch.distributions.Normal(out.mean, out.std).log_prob(out.prev_sample)
    reference = reference.mean(dim=(1, 2)) if reduction == "mean" else reference.sum(dim=(1, 2))
    torch.testing.assert_close(out.log_prob, reference, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("noise_schedule", ["gddim", "flow_grpo"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rescoring_a_stored_step_gives_the_same_log_prob_bitwise(noise_schedule, dtype):
    sample, model_output = torch.randn(4, 16, 8).to(dtype), torch.randn(4, 16, 8).to(dtype)
    kwargs = {"eta": 1.2, "noise_schedule": noise_schedule}
    sampled = flow_step(model_output, 0.5, 0.45, sample, generator=torch.Generator().manual_seed(2), **kwargs)
    rescored = flow_step(model_output, 0.5, 0.45, sample, prev_sample=sampled.prev_sample, **kwargs)
    assert sampled.prev_sample.dtype == dtype
    assert torch.equal(rescored.log_prob, sampled.log_prob)


def test_last_step_is_deterministic_and_first_step_is_finite():
    sample, model_output = torch.randn(2, 16, 8), torch.randn(2, 16, 8)
    last = flow_step(model_output, 0.1, 0.0, sample, eta=1.5, generator=torch.Generator().manual_seed(0))
    assert last.log_prob is None
    torch.testing.assert_close(last.prev_sample, sample - 0.1 * model_output)  # x0
    first = flow_step(model_output, 1.0, 0.9, sample, eta=1.5, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(first.log_prob).all() and torch.isfinite(first.prev_sample).all()
    # at t = 1 the sample holds no signal, so the step re-noises x0 fully: std = s
    assert first.std.max().item() == pytest.approx(0.9, rel=1e-6)


@pytest.mark.parametrize("eta", [1.2, 2.0, 5.0, 20.0])
def test_large_eta_stays_finite_and_below_s(eta):
    sigmas = torch.linspace(1.0, 0.0, 21)
    sample, model_output = torch.randn(2, 16, 8), torch.randn(2, 16, 8)
    for i in range(20):
        out = flow_step(model_output, sigmas[i], sigmas[i + 1], sample, eta=eta, generator=torch.Generator())
        assert torch.isfinite(out.prev_sample).all() and torch.isfinite(out.mean).all()
        assert out.std.double().max().item() <= sigmas[i + 1].item() * (1 + 1e-6)


def test_flow_grpo_matches_gddim_noise_for_small_steps_at_a_equal_eta_sqrt2():
    """The variance Flow-GRPO injects with noise level a equals gDDIM-flow's at eta = a / sqrt(2) as dt -> 0."""
    sample, model_output = torch.randn(1, 16, 8), torch.randn(1, 16, 8)
    for t in [0.9, 0.5, 0.2]:
        s = t - 1e-4
        grpo = flow_step(model_output, t, s, sample, eta=0.7, noise_schedule="flow_grpo")
        gddim = flow_step(model_output, t, s, sample, eta=0.7 / math.sqrt(2.0))
        assert grpo.std.item() == pytest.approx(gddim.std.item(), rel=1e-3)
        torch.testing.assert_close(grpo.mean, gddim.mean, rtol=1e-3, atol=1e-5)


def test_flow_grpo_at_eta_zero_is_euler_and_uses_next_sigma_at_t_one():
    sample, model_output = torch.randn(2, 16, 8), torch.randn(2, 16, 8)
    euler = flow_step(model_output, 0.8, 0.7, sample, eta=0.0, noise_schedule="flow_grpo")
    torch.testing.assert_close(euler.prev_sample, sample - 0.1 * model_output)
    assert euler.log_prob is None
    first = flow_step(model_output, 1.0, 0.9, sample, eta=0.7, noise_schedule="flow_grpo", generator=torch.Generator())
    expected_std = 0.7 * math.sqrt(1.0 / (1.0 - 0.9)) * math.sqrt(0.1)
    assert first.std.max().item() == pytest.approx(expected_std, rel=1e-6)


def test_bad_arguments_are_rejected():
    x = torch.randn(1, 16, 8)
    with pytest.raises(ValueError, match="eta must be a finite number >= 0"):
        flow_step(x, 0.5, 0.4, x, eta=-1.0)
    with pytest.raises(ValueError, match="eta must be a finite number >= 0"):
        flow_step(x, 0.5, 0.4, x, eta=float("nan"))
    with pytest.raises(ValueError, match="0 <= sigma_next < sigma <= 1"):
        flow_step(x, 0.4, 0.5, x, eta=1.0)
    with pytest.raises(ValueError, match="noise_schedule must be one of"):
        flow_step(x, 0.5, 0.4, x, eta=1.0, noise_schedule="ddim")


def test_eta_zero_is_bitwise_the_euler_step():
    gen = torch.Generator().manual_seed(4)
    sigmas = torch.linspace(1.0, 0.0, 1001)
    for i in range(0, 1000, 7):
        sample, v = torch.randn(2, 16, 8, generator=gen), torch.randn(2, 16, 8, generator=gen)
        out = flow_step(v, sigmas[i], sigmas[i + 1], sample, eta=0.0)
        assert torch.equal(out.prev_sample, sample + (sigmas[i + 1] - sigmas[i]) * v), f"step {i}"


def test_pred_original_sample_is_x_t_minus_t_v():
    sample, v = torch.randn(2, 16, 8), torch.randn(2, 16, 8)
    for schedule in ("gddim", "flow_grpo"):
        out = flow_step(v, 0.6, 0.5, sample, eta=1.0, noise_schedule=schedule, generator=torch.Generator())
        torch.testing.assert_close(out.pred_original_sample, sample - 0.6 * v)


@pytest.mark.parametrize("eta", [0.001, 0.003, 0.01, 0.1])
def test_small_eta_std_matches_the_float64_formula_on_a_fine_grid(eta):
    sigmas = torch.linspace(1.0, 0.0, 1001)
    x = torch.randn(1, 16, 8)
    worst = 0.0
    for i in range(1, 999):
        t, s = sigmas[i].double(), sigmas[i + 1].double()
        r = ((1 - t) * s / (t * (1 - s))) ** 2
        expected = (s**2 * (1 - r ** (eta**2))).sqrt().item()
        out = flow_step(x, sigmas[i], sigmas[i + 1], x, eta=eta)
        worst = max(worst, abs(out.std.max().item() - expected) / expected)
    assert worst < 1e-5


def test_an_eta_whose_square_overflows_is_a_value_error():
    x = torch.randn(1, 16, 8)
    with pytest.raises(ValueError, match="eta\\^2 overflows"):
        flow_step(x, 0.5, 0.4, x, eta=1e155)
