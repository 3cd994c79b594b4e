"""One reverse step of a variance-preserving diffusion model (Stable Diffusion) with its log-probability.

Notation (DESIGN.md): ``a_t`` is ``alphas_cumprod`` at the current timestep, ``a_p`` at the previous (less noisy)
one, ``SNR = a / (1 - a)`` and ``r = SNR_t / SNR_p`` in (0, 1).

gDDIM (Zhang, Tao & Chen 2022), the default ``noise_schedule="gddim"``::

    sigma^2 = (1 - a_p) * (1 - r ** (eta^2))
    mean    = sqrt(a_p) * x0 + sqrt(1 - a_p) * r ** (eta^2 / 2) * eps
    x_p     = mean + sigma * z

eta = 0 is DDIM, eta = 1 the DDPM posterior (diffusers' ``DDIMScheduler.step(eta=1)``), and every eta > 1 stays
valid because sigma^2 < 1 - a_p for all eta. The classic DDIM parameterisation (``noise_schedule="ddim"``)::

    sigma^2 = eta^2 * (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)      (DDIM paper, eq. 16)
    mean    = sqrt(a_p) * x0 + sqrt(1 - a_p - sigma^2) * eps

is only defined while sigma^2 < 1 - a_p; past that it raises instead of returning NaN.
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

VPNoiseSchedule = Literal["gddim", "ddim"]
PredictionType = Literal["epsilon", "v_prediction", "sample"]
VP_NOISE_SCHEDULES: tuple[str, ...] = ("gddim", "ddim")
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction", "sample")


def to_x0_eps(
    model_output: torch.Tensor, sample: torch.Tensor, alpha_t: torch.Tensor, prediction_type: PredictionType
) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert an epsilon-, v- or sample-prediction at ``x_t`` to ``(x0, eps)``, float32.

    ``alpha_t`` is ``a_t`` broadcastable against ``sample``.
    """
    model_output = model_output.to(torch.float32)
    sample = sample.to(torch.float32)
    sqrt_a, sqrt_1ma = alpha_t.sqrt(), (1.0 - alpha_t).sqrt()
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (sample - sqrt_1ma * eps) / sqrt_a
    elif prediction_type == "v_prediction":
        x0 = sqrt_a * sample - sqrt_1ma * model_output
        eps = sqrt_a * model_output + sqrt_1ma * sample
    elif prediction_type == "sample":
        x0 = model_output
        eps = (sample - sqrt_a * x0) / sqrt_1ma
    else:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}; got {prediction_type!r}.")
    return x0, eps


def _alpha_at(
    alphas_cumprod: torch.Tensor, timestep: int | torch.Tensor, final_alpha_cumprod: float | torch.Tensor
) -> torch.Tensor:
    """``alphas_cumprod[timestep]`` (scalar or ``[B]``), with ``final_alpha_cumprod`` where the timestep is < 0."""
    timestep = torch.as_tensor(timestep, device=alphas_cumprod.device).long()
    alphas = alphas_cumprod.to(torch.float32)
    final = torch.as_tensor(final_alpha_cumprod, dtype=torch.float32, device=alphas.device)
    return torch.where(timestep >= 0, alphas[timestep.clamp(min=0)], final)


def max_ddim_eta(alpha_t: torch.Tensor, alpha_prev: torch.Tensor) -> torch.Tensor:
    """The supremum of the classic DDIM eta for a step: sigma^2 < 1 - a_p  <=>  eta^2 < (1 - a_t) a_p / (a_p - a_t)."""
    return ((1.0 - alpha_t) * alpha_prev / (alpha_prev - alpha_t)).sqrt()


def gddim_step(
    model_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    *,
    alphas_cumprod: torch.Tensor,
    prev_timestep: int | torch.Tensor,
    eta: float,
    final_alpha_cumprod: float | torch.Tensor = 1.0,
    prediction_type: PredictionType = "epsilon",
    noise_schedule: VPNoiseSchedule = "gddim",
    generator: torch.Generator | list[torch.Generator] | None = None,
    prev_sample: torch.Tensor | None = None,
    log_prob_reduction: LogProbReduction = "mean",
) -> StepOutput:
    """One reverse step ``x_t -> x_p`` of a VP model, sampling it or, given ``prev_sample``, re-scoring it.

    Args:
        model_output: the model's prediction at ``x_t`` after classifier-free guidance, ``[B, C, H, W]``.
        timestep: current timestep ``t`` (int, or ``[B]`` for per-sample timesteps).
        sample: ``x_t``, ``[B, C, H, W]``.
        alphas_cumprod: the scheduler's ``alphas_cumprod``, ``[num_train_timesteps]``.
        prev_timestep: the previous (less noisy) timestep; below 0 means the final step, which uses
            ``final_alpha_cumprod`` (diffusers: 1.0 if ``set_alpha_to_one`` else ``alphas_cumprod[0]``).
        eta: stochasticity, any finite value >= 0. 0 is DDIM (deterministic), 1 the DDPM posterior.
        prediction_type: what the model predicts: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
        noise_schedule: ``"gddim"`` (valid for every eta) or ``"ddim"`` (classic; raises where undefined).
        generator: a generator, or one per sample, for the noise ``z``.
        prev_sample: a stored ``x_p``; when given, nothing is sampled and its log-probability is returned.
        log_prob_reduction: ``"mean"`` (default, as DDPO and Flow-GRPO) or ``"sum"`` over non-batch elements.

    Returns:
        A :class:`StepOutput`; ``log_prob`` is ``None`` when the step is deterministic (std = 0).
    """
    eta = check_eta(eta)
    check_reduction(log_prob_reduction)
    if noise_schedule not in VP_NOISE_SCHEDULES:
        raise ValueError(f"noise_schedule must be one of {VP_NOISE_SCHEDULES} for a VP model; got {noise_schedule!r}.")

    # 1. alphas at the current and previous timestep, [B or 1], computed where the schedule lives: a policy keeps
    #    it on the host, so the checks below cost no device synchronisation
    batch = sample.shape[0]
    alpha_t = batch_values(_alpha_at(alphas_cumprod, timestep, final_alpha_cumprod), batch)
    alpha_p = batch_values(_alpha_at(alphas_cumprod, prev_timestep, final_alpha_cumprod), batch)
    if bool((alpha_p < alpha_t).any()):
        raise ValueError("prev_timestep must be less noisy than timestep (alphas_cumprod[prev] >= alphas_cumprod[t]).")

    # 2. variance sigma^2 and the coefficient c of eps in the mean
    if noise_schedule == "gddim":
        # r = SNR_t / SNR_p (float64), written so that a_p = 1 (the final step) gives r = 0 rather than inf / inf;
        # 1 - r^(eta^2) as -expm1(eta^2 log r), exact at small eta
        a_t64, a_p64 = alpha_t.double(), alpha_p.double()
        r = a_t64 * (1.0 - a_p64) / ((1.0 - a_t64) * a_p64)
        powers = gddim_powers(r, eta)
        variance = (1.0 - alpha_p) * powers.one_minus_r_pow
        eps_coef = (1.0 - alpha_p).sqrt() * powers.r_pow_half
    else:
        # DDIM eq. 16: sigma_t(eta)^2 = eta^2 (1 - a_p) / (1 - a_t) (1 - a_t / a_p)
        variance = eta**2 * (1.0 - alpha_p) / (1.0 - alpha_t) * (1.0 - alpha_t / alpha_p)
        room = 1.0 - alpha_p - variance
        undefined = (room < 0) | ((room == 0) & (variance > 0))
        if bool(undefined.any()):
            largest = max_ddim_eta(alpha_t, alpha_p)[undefined].min().item()
            raise ValueError(
                f"noise_schedule='ddim' is undefined for eta={eta} at this step (sigma^2 >= 1 - a_prev); "
                f"eta must be below {largest:.4f} here. Use noise_schedule='gddim', which is valid for every eta."
            )
        eps_coef = room.sqrt()

    # 3. predicted x0 and eps ("predicted x_0" of DDIM eq. 12)
    x0, eps = to_x0_eps(model_output, sample, per_sample(alpha_t, sample), prediction_type)

    # 4. mean of x_p ("direction pointing to x_t", DDIM eq. 12) and its std
    mean = per_sample(alpha_p.sqrt(), sample) * x0 + per_sample(eps_coef, sample) * eps
    std = variance.clamp(min=0.0).sqrt()

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
