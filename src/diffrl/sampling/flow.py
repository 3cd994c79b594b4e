"""One reverse step of a rectified-flow model (FLUX) with its log-probability.

The forward process is ``x_t = (1 - t) x0 + t eps``; the model predicts the velocity ``v ~ eps - x0``. A step
goes from ``t`` to ``s < t`` (consecutive entries of the scheduler's ``sigmas``).

gDDIM-flow, the default ``noise_schedule="gddim"`` (the VP formula with alpha = 1 - t, sigma = t)::

    x0  = x_t - t v            eps = x_t + (1 - t) v
    r   = ((1 - t) s / (t (1 - s)))^2                       (SNR_t / SNR_s)
    sigma^2 = s^2 (1 - r ** (eta^2))
    x_s = (1 - s) x0 + s r ** (eta^2 / 2) eps + sigma z
        = x_t + (s - t) v + s (r ** (eta^2 / 2) - 1) eps + sigma z        (the Euler step plus a shrinkage of eps)

The mean is computed in the second form, so eta = 0 is exactly (bitwise) the Euler step ``x_t + (s - t) v``; the
last step (s = 0) has sigma = 0 and no log-prob.

The Flow-GRPO SDE (``noise_schedule="flow_grpo"``, Euler-Maruyama with ``sigma_t = a sqrt(t / (1 - t))``)::

    mean = x_t (1 + sigma_t^2 / (2 t) dt) + v (1 + sigma_t^2 (1 - t) / (2 t)) dt,     dt = s - t < 0
    std  = sigma_t sqrt(-dt)

Here ``eta`` is Flow-GRPO's noise level ``a`` itself (its default is 0.7), so configs port unchanged; for small
steps it injects the same noise as gDDIM-flow at ``eta_gddim = a / sqrt(2)``. As in Flow-GRPO, ``sigma_t`` at
t = 1 (where it is infinite) uses ``s`` in place of ``t`` inside ``1 - t``.
"""

from __future__ import annotations

from typing import Literal

import torch

from diffrl.sampling.common import (
    LogProbReduction,
    StepOutput,
    batch_values,
    check_eta,
    check_reduction,
    finish_step,
    gddim_powers,
    per_sample,
)

FlowNoiseSchedule = Literal["gddim", "flow_grpo"]
FLOW_NOISE_SCHEDULES: tuple[str, ...] = ("gddim", "flow_grpo")


def flow_step(
    model_output: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    sample: torch.Tensor,
    *,
    eta: float,
    noise_schedule: FlowNoiseSchedule = "gddim",
    generator: torch.Generator | list[torch.Generator] | None = None,
    prev_sample: torch.Tensor | None = None,
    log_prob_reduction: LogProbReduction = "mean",
) -> StepOutput:
    """One reverse step ``x_t -> x_s`` of a rectified-flow model, sampling it or re-scoring a stored ``prev_sample``.

    Args:
        model_output: predicted velocity ``v`` at ``x_t`` (after guidance), ``[B, ...]`` (packed FLUX latents
            ``[B, N, C]`` or image latents ``[B, C, H, W]``).
        sigma: current noise level ``t`` in (0, 1] (scalar or ``[B]``): ``scheduler.sigmas[i]``.
        sigma_next: next noise level ``s`` in [0, t) (scalar or ``[B]``): ``scheduler.sigmas[i + 1]``.
        sample: ``x_t``, same shape as ``model_output``.
        eta: stochasticity, any finite value >= 0; 0 is the Euler ODE step.
        noise_schedule: ``"gddim"`` (default) or ``"flow_grpo"`` (eta is then Flow-GRPO's noise level ``a``).
        generator: a generator, or one per sample, for the noise ``z``.
        prev_sample: a stored ``x_s``; when given, nothing is sampled and its log-probability is returned.
        log_prob_reduction: ``"mean"`` (default, as DDPO and Flow-GRPO) or ``"sum"`` over non-batch elements.

    Returns:
        A :class:`StepOutput`; ``log_prob`` is ``None`` when the step is deterministic (std = 0).
    """
    eta = check_eta(eta)
    check_reduction(log_prob_reduction)
    if noise_schedule not in FLOW_NOISE_SCHEDULES:
        raise ValueError(
            f"noise_schedule must be one of {FLOW_NOISE_SCHEDULES} for a flow model; got {noise_schedule!r}."
        )

    # 1. noise levels, [B or 1], where the schedule lives (the host, in a policy's step: no device synchronisation)
    t = batch_values(sigma, sample.shape[0])
    s = batch_values(sigma_next, sample.shape[0])
    if bool(((t <= 0) | (t > 1) | (s < 0) | (s >= t)).any()):
        raise ValueError(f"flow steps need 0 <= sigma_next < sigma <= 1; got sigma={sigma}, sigma_next={sigma_next}.")

    v = model_output.to(torch.float32)
    x_t = sample.to(torch.float32)
    if noise_schedule == "gddim":
        # 2. r = SNR_t / SNR_s (float64); 1 - r^(eta^2) and r^(eta^2/2) - 1 through expm1 (exact at small eta)
        t64, s64 = t.double(), s.double()
        r = ((1.0 - t64) * s64 / (t64 * (1.0 - s64))) ** 2
        powers = gddim_powers(r, eta)
        variance = s**2 * powers.one_minus_r_pow
        std = variance.clamp(min=0.0).sqrt()
        # 3. the Euler step plus the shrinkage of eps = x_t + (1 - t) v; the shrinkage is exactly 0 at eta = 0
        euler = x_t + per_sample(s - t, sample) * v
        shrink = per_sample(s * powers.r_pow_half_minus_one, sample)
        mean = euler if eta == 0.0 else euler + shrink * (x_t + per_sample(1.0 - t, sample) * v)
    else:
        # 2. Flow-GRPO: sigma_t = a sqrt(t / (1 - t)), with s in place of t inside 1 - t at t = 1; Euler-Maruyama
        #    on the reverse SDE whose score term is -eps / t
        dt = s - t
        one_minus_t = torch.where(t >= 1.0, 1.0 - s, 1.0 - t)
        sigma_t = eta * (t / one_minus_t).sqrt()
        x_coef = 1.0 + sigma_t**2 / (2.0 * t) * dt
        v_coef = (1.0 + sigma_t**2 * (1.0 - t) / (2.0 * t)) * dt
        std = sigma_t * (-dt).sqrt()
        # 3. the mean of x_s
        mean = per_sample(x_coef, sample) * x_t + per_sample(v_coef, sample) * v

    # 4. predicted x0
    x0 = x_t - per_sample(t, sample) * v

    # 5. sample (or take the stored sample) and score it
    return finish_step(
        mean=mean,
        std=std,
        x0=x0,
        sample=sample,
        generator=generator,
        prev_sample=prev_sample,
        reduction=log_prob_reduction,
    )
