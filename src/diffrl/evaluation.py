"""ODE vs SDE evaluation: the same prompts from the same noise, sampled at eta = 0 and at the training eta.

Every prompt gets one seed (``seed + index``), so under every eta a sample starts from the same initial noise
and the only difference is the sampler's stochasticity. The gap ``reward(eta=0) - reward(eta=train)`` is a paired
difference; its standard error is that of the per-prompt differences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from diffrl.config import Config
from diffrl.rewards.combine import WeightedSum
from diffrl.sampling.rollout import rollout


@dataclass
class EvalResult:
    """Per-eta reward statistics for every reward part (and ``"total"`` when there are several parts).

    Attributes:
        etas: the etas evaluated, in order.
        num_steps: denoising steps.
        scores: ``scores[name][eta]`` is the ``[N]`` per-prompt reward.
        train_eta: the eta the gap is measured against (``None``: no gap).
    """

    etas: list[float]
    num_steps: int
    scores: dict[str, dict[float, torch.Tensor]] = field(default_factory=dict)
    train_eta: float | None = None

    def mean(self, name: str, eta: float) -> float:
        return self.scores[name][eta].mean().item()

    def stderr(self, name: str, eta: float) -> float:
        values = self.scores[name][eta]
        return values.std().item() / math.sqrt(len(values)) if len(values) > 1 else 0.0

    def gap(self, name: str) -> tuple[float, float]:
        """``(mean, standard error)`` of ``reward(eta=0) - reward(eta=train_eta)`` over prompts."""
        if self.train_eta is None or 0.0 not in self.scores[name]:
            raise ValueError("the gap needs eta = 0 and a train_eta among the evaluated etas.")
        return paired_difference(self.scores[name][0.0], self.scores[name][self.train_eta])

    def to_metrics(self, prefix: str = "eval") -> dict[str, float]:
        """``{prefix}/{reward}/eta={x}/mean`` (and ``/stderr``) and ``{prefix}/{reward}/gap``."""
        metrics = {}
        for name in self.scores:
            for eta in self.etas:
                metrics[f"{prefix}/{name}/eta={eta:g}/mean"] = self.mean(name, eta)
                metrics[f"{prefix}/{name}/eta={eta:g}/stderr"] = self.stderr(name, eta)
            if self.train_eta in self.etas and 0.0 in self.etas and self.train_eta != 0.0:
                metrics[f"{prefix}/{name}/gap"], metrics[f"{prefix}/{name}/gap_stderr"] = self.gap(name)
        return metrics


def paired_difference(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """``(mean, standard error)`` of ``a - b`` for scores of the same samples (same prompts, same noise).

    Pairing removes what the two sets share (the prompt, the initial noise) from the error, so a change much
    smaller than either mean's own standard error can still be told from noise.
    """
    if a.shape != b.shape or a.dim() != 1:
        raise ValueError(
            f"paired scores must be two 1-D tensors of one length; got {tuple(a.shape)} and {tuple(b.shape)}."
        )
    diff = a.float() - b.float()
    stderr = diff.std().item() / math.sqrt(len(diff)) if len(diff) > 1 else 0.0
    return diff.mean().item(), stderr


def _rollouts(policy, prompts: list[str], seeds: list[int], batch_size: int, step_seeds=None, **kwargs):
    """:func:`rollout` over ``prompts`` in batches of ``batch_size``: yields each batch's trajectory."""
    for start in range(0, len(prompts), batch_size):
        end = start + batch_size
        batch_step_seeds = None if step_seeds is None else step_seeds[start:end]
        yield rollout(policy, prompts[start:end], seeds[start:end], step_seeds=batch_step_seeds, **kwargs)


@torch.no_grad()
def evaluate(
    policy,
    prompts: list[str],
    reward: WeightedSum,
    *,
    etas: tuple[float, ...] = (0.0, 1.0),
    train_eta: float | None = None,
    num_steps: int = 20,
    guidance_scale: float = 4.0,
    seed: int = 1234,
    batch_size: int = 32,
    noise_schedule: str = "gddim",
    images_out: dict[float, torch.Tensor] | None = None,
) -> EvalResult:
    """Sample every prompt under every eta from the same per-prompt noise and score it.

    ``train_eta`` defaults to the last non-zero eta. When ``images_out`` is a dict it receives the images per eta.
    """
    etas = tuple(float(e) for e in etas)
    if train_eta is None:
        nonzero = [e for e in etas if e != 0.0]
        train_eta = nonzero[-1] if nonzero else None
    result = EvalResult(etas=list(etas), num_steps=num_steps, train_eta=train_eta)
    seeds = [seed + i for i in range(len(prompts))]
    multi = len(reward.names) > 1
    for eta in etas:
        parts: dict[str, list[torch.Tensor]] = {}
        images = []
        for trajectory in _rollouts(
            policy, prompts, seeds, batch_size, eta=eta, num_steps=num_steps, guidance_scale=guidance_scale,
            noise_schedule=noise_schedule,
        ):  # fmt: skip
            out = reward.score(trajectory.images, trajectory.prompts, [{} for _ in trajectory.prompts])
            for name, values in out.parts.items():
                parts.setdefault(name, []).append(values)
            if multi:
                parts.setdefault("total", []).append(out.total)
            images.append(trajectory.images.cpu())
        for name, chunks in parts.items():
            result.scores.setdefault(name, {})[eta] = torch.cat(chunks)
        if images_out is not None:
            images_out[eta] = torch.cat(images)
    return result


def evaluate_with_config(
    policy,
    config: Config,
    prompts: list[str],
    reward: WeightedSum,
    *,
    etas: tuple[float, ...],
    num_steps: int | None = None,
    images_out: dict[float, torch.Tensor] | None = None,
) -> EvalResult:
    """:func:`evaluate` with a run's settings: its guidance, noise schedule and batch size, the evaluation seed and
    step count (unless ``num_steps`` is given); the gap is measured against the training eta when it is evaluated."""
    etas = tuple(float(e) for e in etas)
    return evaluate(
        policy,
        prompts,
        reward,
        etas=etas,
        train_eta=config.sample.eta if config.sample.eta in etas else None,
        num_steps=num_steps or config.eval.num_steps,
        guidance_scale=config.sample.guidance_scale,
        seed=config.eval.seed,
        batch_size=config.sample.batch_size,
        noise_schedule=config.sample.noise_schedule,
        images_out=images_out,
    )


@dataclass
class NoiseVariance:
    """Where the reward's variance comes from when only ``sde_window``'s steps are stochastic.

    Attributes:
        sde_window: the stochastic steps ``[start, end)`` (``None``: every step).
        mean: the mean reward of every sample.
        step_var: the variance between samples of the same prompt and the same initial noise (so from the window's
            step noise alone), averaged over prompts and initial noises.
        prompt_var: the variance between samples of the same prompt (initial and step noise), averaged over prompts.
    """

    sde_window: tuple[int, int] | None
    mean: float
    step_var: float
    prompt_var: float

    @property
    def step_share(self) -> float:
        """The fraction of a prompt's reward variance that the window's steps explain: the part a policy gradient on
        those steps can assign credit for (GRPO's advantages are computed within a prompt)."""
        return self.step_var / self.prompt_var if self.prompt_var > 0 else float("nan")


@torch.no_grad()
def noise_variance(
    policy,
    prompts: list[str],
    reward: WeightedSum,
    windows: list[tuple[int, int] | None],
    *,
    eta: float = 1.0,
    num_steps: int = 20,
    guidance_scale: float = 4.0,
    noise_schedule: str = "gddim",
    initial_noises: int = 2,
    step_noises: int = 4,
    seed: int = 1234,
    batch_size: int = 32,
) -> list[NoiseVariance]:
    """For each SDE window, sample every prompt from ``initial_noises`` initial noises times ``step_noises`` step
    noises and split the reward's variance into the part the window's step noise explains and the whole
    within-prompt variance (sample variances, ``n - 1`` denominators). A window whose steps explain most of the
    variance is one where trained steps decide the reward; see ``scripts/reward_variance.py``."""
    if initial_noises < 1 or step_noises < 2:
        raise ValueError(
            f"noise_variance needs initial_noises >= 1 and step_noises >= 2; got {initial_noises} and {step_noises}."
        )
    a, b = initial_noises, step_noises
    expanded = [p for p in prompts for _ in range(a * b)]
    # the initial noise depends on (prompt, a), the step noise on (prompt, a, b)
    seeds = [seed + (i // b) for i in range(len(expanded))]
    step_seeds = [seed + 1_000_003 + i for i in range(len(expanded))]
    rows = []
    for window in windows:
        rewards = []
        for trajectory in _rollouts(
            policy, expanded, seeds, batch_size, step_seeds=step_seeds, eta=eta, num_steps=num_steps,
            guidance_scale=guidance_scale, noise_schedule=noise_schedule, sde_window=window,
        ):  # fmt: skip
            metadata = [{} for _ in trajectory.prompts]
            rewards.append(reward.score(trajectory.images, trajectory.prompts, metadata).total.float().cpu())
        r = torch.cat(rewards)
        if r.isnan().any():
            raise ValueError(
                f"the reward dropped {int(r.isnan().sum())} of {len(r)} samples (NaN) under sde_window {window}; "
                "noise_variance needs every sample scored: fix the reward or leave out the prompts it cannot score."
            )
        r = r.view(len(prompts), a, b)
        rows.append(
            NoiseVariance(
                sde_window=window,
                mean=r.mean().item(),
                step_var=r.var(dim=2).mean().item(),
                prompt_var=r.view(len(prompts), a * b).var(dim=1).mean().item(),
            )
        )
    return rows


@torch.no_grad()
def step_leverage(policy, num_steps: int, *, eta: float = 1.0, noise_schedule: str = "gddim") -> list[float]:
    """For each step, how far the transition's mean moves, in units of its standard deviation, when the model
    output moves by one (averaged over latent elements): ``|d mean / d output| / std``.

    A policy gradient can only re-weight a step's outcomes by as much as the policy can move that step's mean
    relative to its noise, so a window is worth training where the step noise explains the reward
    (:func:`noise_variance`) *and* the leverage is not small. Every step is affine in the model output, so two
    evaluations give the slope exactly. A step with no noise (eta = 0, or the last step of a flow model) has
    infinite leverage: it is not a stochastic step and has no log-probability to train.
    """
    x = policy.initial_latents([torch.Generator().manual_seed(0)])
    zero, one = torch.zeros_like(x), torch.ones_like(x)
    leverage = []
    for i in range(num_steps):
        kwargs = {"eta": eta, "noise_schedule": noise_schedule, "generator": [torch.Generator().manual_seed(i)]}
        at_zero = policy.step(zero, num_steps, i, x, **kwargs)
        at_one = policy.step(one, num_steps, i, x, **kwargs)
        slope = (at_one.mean - at_zero.mean).abs().mean().item()
        std = at_zero.std.max().item()
        leverage.append(slope / std if std > 0 else math.inf)
    return leverage
