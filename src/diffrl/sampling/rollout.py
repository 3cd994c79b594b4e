"""The denoising loop: sample trajectories from a policy and record the log-probability of every stochastic step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm


@dataclass
class Trajectory:
    """A batch of B sampled trajectories of T steps.

    Attributes:
        latents: ``[B, T + 1, ...]`` float32, x_T first and the final latent last.
        log_probs: ``[B, T]`` float32, log-probability of each step; 0 where ``sde_mask`` is False.
        timesteps: ``[T]``, the model's timestep input at each step.
        sde_mask: ``[T]`` bool, which steps were stochastic (and so can be trained).
        prompt_embeds: the policy's prompt encoding, batch-first (a tensor, or a tuple of tensors).
        prompts: the B prompts.
        seeds: the B per-sample seeds (initial noise and step noise).
        images: ``[B, 3, H, W]`` float32 in [0, 1], the decoded final latents.
        eta, num_steps, guidance_scale, noise_schedule: how the trajectories were sampled.
    """

    latents: torch.Tensor
    log_probs: torch.Tensor
    timesteps: torch.Tensor
    sde_mask: torch.Tensor
    prompt_embeds: Any
    prompts: list[str]
    seeds: list[int]
    images: torch.Tensor
    eta: float
    num_steps: int
    guidance_scale: float
    noise_schedule: str = "gddim"


def sde_window_mask(num_steps: int, sde_window: tuple[int, int] | None) -> torch.Tensor:
    """``[T]`` bool: True on the steps ``[start, end)`` of the window (every step when the window is None)."""
    mask = torch.zeros(num_steps, dtype=torch.bool)
    start, end = (0, num_steps) if sde_window is None else sde_window
    if not 0 <= start < end <= num_steps:
        raise ValueError(f"sde_window must satisfy 0 <= start < end <= num_steps={num_steps}; got {sde_window}.")
    mask[start:end] = True
    return mask


def moving_window(
    sde_window: tuple[int, int] | None, num_steps: int, stride: int, shift_every: int, epoch: int
) -> tuple[int, int] | None:
    """The SDE window at ``epoch`` (0-based) when it moves over training, as in MixGRPO's progressive strategy: it
    starts at ``sde_window`` and moves ``stride`` steps later every ``shift_every`` epochs until its end reaches
    ``num_steps``, where it stays. ``stride = 0`` (or no window) keeps it fixed."""
    if sde_window is None or stride == 0:
        return sde_window
    start, end = sde_window
    shift = min(stride * (epoch // shift_every), num_steps - end)
    return start + shift, end + shift


def _mirror(policy, out, mirrored: torch.Tensor, model_output, num_steps, i, x, eta, noise_schedule, reduction):
    """The step ``out`` with rows ``mirrored`` (``[B]`` bool) moved to ``mean - (prev_sample - mean)``, every row
    re-scored from its stored sample (as training re-scores it, so that the ratio is exactly 1 there)."""
    shape = (-1,) + (1,) * (out.prev_sample.dim() - 1)
    opposite = (2 * out.mean - out.prev_sample.float()).to(out.prev_sample.dtype)
    prev_sample = torch.where(mirrored.view(shape), opposite, out.prev_sample)
    return policy.step(
        model_output, num_steps, i, x, eta=eta, noise_schedule=noise_schedule, prev_sample=prev_sample,
        log_prob_reduction=reduction,
    )  # fmt: skip


def select_embeds(embeds: Any, index: torch.Tensor | slice) -> Any:
    """Rows ``index`` of a prompt encoding that is a tensor or a tuple of batch-first tensors."""
    if isinstance(embeds, tuple):
        return tuple(e[index] for e in embeds)
    return embeds[index]


@torch.no_grad()
def rollout(
    policy,
    prompts: list[str],
    seeds: list[int],
    *,
    eta: float,
    num_steps: int,
    guidance_scale: float,
    noise_schedule: str = "gddim",
    sde_window: tuple[int, int] | None = None,
    log_prob_reduction: str = "mean",
    step_seeds: list[int] | None = None,
    mirror: list[bool] | None = None,
    progress: bool = False,
) -> Trajectory:
    """Sample one trajectory per prompt.

    Each sample has its own generator seeded by its seed: it draws the initial noise first, so the same seeds
    start from the same noise under every eta (evaluation compares ODE and SDE this way). With ``step_seeds``
    the step noise comes from separate generators instead (GRPO groups that share initial noise). Steps outside
    ``sde_window`` are ODE steps (eta = 0) and carry no log-probability; so does a step whose variance is zero
    (e.g. the last step of a flow model). Rows where ``mirror`` is True take the opposite of the step noise their
    generator draws, ``mean - std z`` for ``mean + std z`` (antithetic sampling: a row and its mirror that share
    seeds are an opposite pair, and each is still an exact sample of the policy).
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"rollout got {len(prompts)} prompts but {len(seeds)} seeds.")
    generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
    prompt_embeds = policy.encode_prompts(prompts)
    x = policy.initial_latents(generators)
    if step_seeds is not None:
        if len(step_seeds) != len(seeds):
            raise ValueError(f"rollout got {len(seeds)} seeds but {len(step_seeds)} step seeds.")
        generators = [torch.Generator().manual_seed(int(seed)) for seed in step_seeds]
    if mirror is not None and len(mirror) != len(seeds):
        raise ValueError(f"rollout got {len(seeds)} seeds but {len(mirror)} mirror flags.")
    mirrored = None if mirror is None or not any(mirror) else torch.tensor(mirror, device=x.device)
    sde_mask = sde_window_mask(num_steps, sde_window) & torch.tensor(eta > 0)
    latents = [x]
    log_probs = torch.zeros(len(prompts), num_steps, device=x.device)
    timesteps = []
    for i in tqdm(range(num_steps), desc="sampling", disable=not progress, leave=False):
        t = policy.timestep_input(num_steps, i)
        timesteps.append(t)
        model_output = policy.predict(x, t, prompt_embeds, guidance_scale)
        out = policy.step(
            model_output,
            num_steps,
            i,
            x,
            eta=eta if sde_mask[i] else 0.0,
            noise_schedule=noise_schedule,
            generator=generators,
            log_prob_reduction=log_prob_reduction,
        )
        if out.log_prob is None:
            sde_mask[i] = False
        else:
            if mirrored is not None:
                out = _mirror(
                    policy, out, mirrored, model_output, num_steps, i, x, eta, noise_schedule, log_prob_reduction
                )
            log_probs[:, i] = out.log_prob
        x = out.prev_sample
        latents.append(x)
    return Trajectory(
        latents=torch.stack(latents, dim=1),
        log_probs=log_probs,
        timesteps=torch.stack(timesteps),
        sde_mask=sde_mask,
        prompt_embeds=prompt_embeds,
        prompts=list(prompts),
        seeds=[int(s) for s in seeds],
        images=policy.decode(x),
        eta=eta,
        num_steps=num_steps,
        guidance_scale=guidance_scale,
        noise_schedule=noise_schedule,
    )
