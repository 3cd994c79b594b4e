"""A correctness yardstick for the step functions: data drawn from N(m, s^2 I), where the exact denoiser is known.

For Gaussian data the conditional expectations have closed forms, so a sampler driven by the analytic model
must return samples whose mean is m (exactly in expectation, for every step count) and whose std tends to s as the
number of steps grows; what is left is the sampler's own discretisation bias.

VP:   x_t = sqrt(a) x0 + sqrt(1 - a) eps,  x_t ~ N(sqrt(a) m, a s^2 + 1 - a),
      E[eps | x_t] = sqrt(1 - a) (x_t - sqrt(a) m) / (a s^2 + 1 - a).
Flow: x_t = (1 - t) x0 + t eps,           x_t ~ N((1 - t) m, (1 - t)^2 s^2 + t^2),
      E[v | x_t] = E[eps | x_t] - E[x0 | x_t] = (t - (1 - t) s^2) (x_t - (1 - t) m) / var_t - m.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from diffrl.sampling.flow import flow_step
from diffrl.sampling.gddim import gddim_step


@dataclass
class GaussianSamplerError:
    """How far samples are from N(m, s^2): relative errors ``mean / m - 1`` and ``std / s - 1``."""

    mean_rel_error: float
    std_rel_error: float
    mean_standard_error: float  # standard error of the sample mean, relative to m


def scaled_linear_alphas_cumprod(
    num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> torch.Tensor:
    """Stable Diffusion's "scaled_linear" schedule, as diffusers builds it: ``[num_train_timesteps]`` float32."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def vp_timesteps(num_steps: int) -> list[int]:
    """``num_steps`` timesteps evenly spaced from 999 to 0 (rounded); the step after the last goes to a_p = 1."""
    return torch.linspace(999, 0, num_steps).round().long().tolist()


def flow_sigmas(num_steps: int) -> list[float]:
    """``num_steps + 1`` noise levels evenly spaced from 1 to 0 (no shift)."""
    return torch.linspace(1.0, 0.0, num_steps + 1).tolist()


def vp_epsilon(x: torch.Tensor, alpha: float, m: float, s: float) -> torch.Tensor:
    """The exact epsilon-prediction ``E[eps | x_t]`` for data N(m, s^2 I) at ``a_t = alpha``."""
    return (1.0 - alpha) ** 0.5 * (x - alpha**0.5 * m) / (alpha * s**2 + 1.0 - alpha)


def flow_velocity(x: torch.Tensor, t: float, m: float, s: float) -> torch.Tensor:
    """The exact velocity ``E[eps - x0 | x_t]`` for data N(m, s^2 I) at noise level ``t``."""
    var_t = (1.0 - t) ** 2 * s**2 + t**2
    return (t - (1.0 - t) * s**2) * (x - (1.0 - t) * m) / var_t - m


def _error(samples: torch.Tensor, m: float, s: float) -> GaussianSamplerError:
    samples = samples.double()
    return GaussianSamplerError(
        mean_rel_error=(samples.mean().item() / m) - 1.0,
        std_rel_error=(samples.std().item() / s) - 1.0,
        mean_standard_error=samples.std().item() / samples.numel() ** 0.5 / abs(m),
    )


def run_vp_chains(
    eta: float,
    num_steps: int,
    *,
    m: float = 1.5,
    s: float = 0.3,
    num_chains: int = 4096,
    dim: int = 64,
    seed: int = 0,
    noise_schedule: str = "gddim",
) -> GaussianSamplerError:
    """Sample ``num_chains`` chains with :func:`gddim_step` and the analytic model.

    Timesteps are evenly spaced from 999 to 0 on SD's scaled-linear schedule; the chains start from the exact
    marginal at t = 999 and the final step goes to a_p = 1 (the clean sample).
    """
    alphas_cumprod = scaled_linear_alphas_cumprod()
    timesteps = vp_timesteps(num_steps)
    generator = torch.Generator().manual_seed(seed)
    alpha_start = alphas_cumprod[timesteps[0]].item()
    var_start = alpha_start * s**2 + 1.0 - alpha_start
    x = alpha_start**0.5 * m + var_start**0.5 * torch.randn(num_chains, dim, generator=generator)
    for i, t in enumerate(timesteps):
        prev_t = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        eps = vp_epsilon(x, alphas_cumprod[t].item(), m, s)
        x = gddim_step(
            eps,
            t,
            x,
            alphas_cumprod=alphas_cumprod,
            prev_timestep=prev_t,
            final_alpha_cumprod=1.0,
            eta=eta,
            noise_schedule=noise_schedule,
            generator=generator,
        ).prev_sample
    return _error(x, m, s)


def run_flow_chains(
    eta: float,
    num_steps: int,
    *,
    m: float = 1.5,
    s: float = 0.3,
    num_chains: int = 4096,
    dim: int = 64,
    seed: int = 0,
    noise_schedule: str = "gddim",
) -> GaussianSamplerError:
    """Sample ``num_chains`` chains with :func:`flow_step` and the analytic velocity; sigmas evenly from 1 to 0."""
    sigmas = flow_sigmas(num_steps)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_chains, dim, generator=generator)
    for t, t_next in itertools.pairwise(sigmas):
        v = flow_velocity(x, t, m, s)
        x = flow_step(v, t, t_next, x, eta=eta, noise_schedule=noise_schedule, generator=generator).prev_sample
    return _error(x, m, s)


def vp_exact_std_error(eta: float, num_steps: int, *, s: float = 0.3) -> float:
    """The relative std error ``std / s - 1`` that :func:`run_vp_chains` converges to, with no sampling noise.

    With the analytic model every gDDIM step is affine in x_t: ``y_p = k y_t + sigma z`` for the centred sample
    ``y = x - sqrt(a) m``, with ``k = (sqrt(a_p a_t) s^2 + c sqrt(1 - a_t)) / (a_t s^2 + 1 - a_t)`` and ``c`` the
    coefficient of eps in the mean. The variance therefore follows ``Var_p = k^2 Var_t + sigma^2`` exactly; this is
    computed in float64 from the step formulas of DESIGN.md, independently of :func:`gddim_step`.
    """
    alphas_cumprod = scaled_linear_alphas_cumprod().double().tolist()
    timesteps = vp_timesteps(num_steps)
    alpha_start = alphas_cumprod[timesteps[0]]
    variance = alpha_start * s**2 + 1.0 - alpha_start
    for i, t in enumerate(timesteps):
        a_t = alphas_cumprod[t]
        a_p = alphas_cumprod[timesteps[i + 1]] if i + 1 < len(timesteps) else 1.0
        r = a_t * (1.0 - a_p) / ((1.0 - a_t) * a_p)
        eps_coef = math.sqrt(1.0 - a_p) * r ** (eta**2 / 2.0)
        k = (math.sqrt(a_p * a_t) * s**2 + eps_coef * math.sqrt(1.0 - a_t)) / (a_t * s**2 + 1.0 - a_t)
        variance = k**2 * variance + (1.0 - a_p) * (1.0 - r ** (eta**2))
    return math.sqrt(variance) / s - 1.0


def flow_exact_std_error(eta: float, num_steps: int, *, s: float = 0.3) -> float:
    """The relative std error that :func:`run_flow_chains` converges to (the flow twin of :func:`vp_exact_std_error`).

    Centred on ``y = x - (1 - t) m``: ``y_s = ((1 - s)(1 - t) s_data^2 + c t) / var_t * y_t + sigma z``.
    """
    sigmas = flow_sigmas(num_steps)
    variance = 1.0
    for t, t_next in itertools.pairwise(sigmas):
        var_t = (1.0 - t) ** 2 * s**2 + t**2
        r = ((1.0 - t) * t_next / (t * (1.0 - t_next))) ** 2
        eps_coef = t_next * r ** (eta**2 / 2.0)
        k = ((1.0 - t_next) * (1.0 - t) * s**2 + eps_coef * t) / var_t
        variance = k**2 * variance + t_next**2 * (1.0 - r ** (eta**2))
    return math.sqrt(variance) / s - 1.0
