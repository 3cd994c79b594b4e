"""ODE vs SDE evaluation: the same prompts from the same noise, sampled with the ODE (eta = 0) and with the sampler
that trained.

Every prompt gets one seed (``seed + index``), so under every sampler a sample starts from the same initial noise
and the only difference is the sampler's stochasticity. The samplers compared (:class:`Sampler`) are labelled:

- ``ode``: eta = 0, every step deterministic;
- ``train_sampler``: the training sampler at that point of training: its eta, noise schedule and SDE window (the
  window that trained the last epoch, rescaled when evaluation takes another step count);
- ``sde_eta=<x>``: every step stochastic at eta ``x`` (``eval.sde_etas``), a labelled extra.

The gap ``reward(ode) - reward(train_sampler)`` is a paired difference; its standard error is that of the
per-prompt differences.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from diffrl.config import Config
from diffrl.rewards.combine import WeightedSum
from diffrl.sampling.rollout import moving_window, rollout

ODE_LABEL = "ode"
TRAIN_LABEL = "train_sampler"


def rescale_window(window: tuple[int, int] | None, from_steps: int, to_steps: int) -> tuple[int, int] | None:
    """The SDE window ``[start, end)`` of a ``from_steps``-step sampler as steps of a ``to_steps``-step one: the
    same span of the trajectory, at least one step wide."""
    if window is None or from_steps == to_steps:
        return window
    start = min(math.floor(window[0] * to_steps / from_steps), to_steps - 1)
    return start, min(to_steps, max(start + 1, math.ceil(window[1] * to_steps / from_steps)))


@dataclass(frozen=True)
class Sampler:
    """One sampler of an evaluation.

    Attributes:
        label: its name in scores and metrics (``ode``, ``train_sampler``, ``sde_eta=<x>``).
        eta: its stochasticity (0: the ODE).
        sde_window: the stochastic steps ``[start, end)`` of a ``window_steps``-step trajectory (None: every step).
        window_steps: the step count ``sde_window`` is given in; rescaled to the evaluation's step count.
    """

    label: str
    eta: float
    sde_window: tuple[int, int] | None = None
    window_steps: int | None = None

    @classmethod
    def every_step(cls, eta: float) -> Sampler:
        return cls(ODE_LABEL, 0.0) if eta == 0 else cls(f"sde_eta={eta:g}", float(eta))

    def window_at(self, num_steps: int) -> tuple[int, int] | None:
        return rescale_window(self.sde_window, self.window_steps or num_steps, num_steps)

    def describe(self, num_steps: int) -> str:
        """What the sampler is, in words: ``eta 1, stochastic steps 0-1 of 20``."""
        if self.eta == 0:
            return "ODE (eta 0)"
        window = self.window_at(num_steps)
        if window is None:
            steps = "every step stochastic"
        else:
            steps = f"stochastic steps {window[0]}-{window[1]} of {num_steps}"
        kind = "training sampler" if self.label == TRAIN_LABEL else "SDE"
        return f"{kind}: eta {self.eta:g}, {steps}"


ODE = Sampler(ODE_LABEL, 0.0)


def training_sampler(config: Config, completed_epochs: int = 0) -> Sampler:
    """The sampler that trained the last of ``completed_epochs`` epochs (the first epoch's before any): the run's
    eta and its SDE window at that epoch (a moving window moves)."""
    cfg = config.sample
    epoch = max(completed_epochs - 1, 0)
    window = moving_window(cfg.sde_window, cfg.num_steps, cfg.window_stride, cfg.window_shift_every, epoch)
    return Sampler(TRAIN_LABEL, float(cfg.eta), window, cfg.num_steps)


@dataclass
class EvalResult:
    """Per-sampler reward statistics for every reward part (and ``"total"`` when there are several parts).

    Attributes:
        samplers: the samplers evaluated, in order.
        num_steps: denoising steps.
        scores: ``scores[name][label]`` is the ``[N]`` per-prompt reward under the sampler labelled ``label``.
    """

    samplers: list[Sampler]
    num_steps: int
    scores: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        return [s.label for s in self.samplers]

    def mean(self, name: str, label: str) -> float:
        return self.scores[name][label].mean().item()

    def stderr(self, name: str, label: str) -> float:
        values = self.scores[name][label]
        return values.std().item() / math.sqrt(len(values)) if len(values) > 1 else 0.0

    def gap(self, name: str, against: str = TRAIN_LABEL) -> tuple[float, float]:
        """``(mean, standard error)`` of ``reward(ode) - reward(against)`` over prompts."""
        if ODE_LABEL not in self.scores[name] or against not in self.scores[name]:
            raise ValueError(f"the gap needs the samplers {ODE_LABEL!r} and {against!r}; evaluated {self.labels}.")
        return paired_difference(self.scores[name][ODE_LABEL], self.scores[name][against])

    def to_metrics(self, prefix: str = "eval") -> dict[str, float]:
        """``{prefix}/{reward}/{label}/mean`` (and ``/stderr``) per sampler; ``{prefix}/{reward}/gap`` (ODE minus
        the training sampler) and ``{prefix}/{reward}/gap_{label}`` for every other stochastic sampler."""
        metrics = {}
        for name, by_label in self.scores.items():
            for label in self.labels:
                if label in by_label:
                    metrics[f"{prefix}/{name}/{label}/mean"] = self.mean(name, label)
                    metrics[f"{prefix}/{name}/{label}/stderr"] = self.stderr(name, label)
            if ODE_LABEL not in by_label:
                continue
            for sampler in self.samplers:
                if sampler.eta == 0 or sampler.label not in by_label:
                    continue
                key = "gap" if sampler.label == TRAIN_LABEL else f"gap_{sampler.label}"
                metrics[f"{prefix}/{name}/{key}"], metrics[f"{prefix}/{name}/{key}_stderr"] = self.gap(
                    name, sampler.label
                )
        return metrics


def primary_reward(names: list[str]) -> str:
    """The reward a table or grid reports: the only part, or ``total`` of a mix."""
    return names[0] if len(names) == 1 else "total"


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
    samplers: Sequence[Sampler] = (ODE, Sampler.every_step(1.0)),
    num_steps: int = 20,
    guidance_scale: float = 4.0,
    seed: int = 1234,
    batch_size: int = 32,
    noise_schedule: str = "gddim",
    images_out: dict[str, torch.Tensor] | None = None,
    progress: bool = False,
) -> EvalResult:
    """Sample every prompt under every sampler from the same per-prompt noise and score it. When ``images_out`` is a
    dict it receives the images per sampler label; ``progress`` shows a bar over the sampling batches."""
    labels = [s.label for s in samplers]
    if len(set(labels)) != len(labels):
        raise ValueError(f"evaluation samplers need distinct labels; got {labels}.")
    result = EvalResult(samplers=list(samplers), num_steps=num_steps)
    seeds = [seed + i for i in range(len(prompts))]
    multi = len(reward.names) > 1
    batches = -(-len(prompts) // batch_size)
    bar = tqdm(total=len(samplers) * batches, desc="evaluation", leave=False, disable=not progress)
    for sampler in samplers:
        parts: dict[str, list[torch.Tensor]] = {}
        images = []
        for trajectory in _rollouts(
            policy, prompts, seeds, batch_size, eta=sampler.eta, num_steps=num_steps, guidance_scale=guidance_scale,
            noise_schedule=noise_schedule, sde_window=sampler.window_at(num_steps) if sampler.eta else None,
        ):  # fmt: skip
            out = reward.score(trajectory.images, trajectory.prompts, [{} for _ in trajectory.prompts])
            for name, values in out.parts.items():
                parts.setdefault(name, []).append(values)
            if multi:
                parts.setdefault("total", []).append(out.total)
            images.append(trajectory.images.cpu())
            bar.update(1)
        for name, chunks in parts.items():
            result.scores.setdefault(name, {})[sampler.label] = torch.cat(chunks)
        if images_out is not None:
            images_out[sampler.label] = torch.cat(images)
    bar.close()
    return result


def run_samplers(config: Config, completed_epochs: int = 0, sde_etas: Sequence[float] | None = None) -> list[Sampler]:
    """What a run evaluates: the ODE, its training sampler after ``completed_epochs`` epochs, and every-step SDE at
    each of ``sde_etas`` (default ``eval.sde_etas``) except where that is the training sampler itself."""
    train = training_sampler(config, completed_epochs)
    samplers = [ODE] if train.eta == 0 else [ODE, train]  # a run that sampled with the ODE has no gap
    for eta in config.eval.sde_etas if sde_etas is None else sde_etas:
        extra = Sampler.every_step(float(eta))
        same_as_train = train.sde_window is None and extra.eta == train.eta
        if extra.eta != 0 and not same_as_train and extra.label not in {s.label for s in samplers}:
            samplers.append(extra)
    return samplers


def evaluate_with_config(
    policy,
    config: Config,
    prompts: list[str],
    reward: WeightedSum,
    *,
    completed_epochs: int = 0,
    sde_etas: Sequence[float] | None = None,
    num_steps: int | None = None,
    images_out: dict[str, torch.Tensor] | None = None,
    progress: bool = False,
) -> EvalResult:
    """:func:`evaluate` with a run's settings: its guidance, noise schedule and batch size, the evaluation seed and
    step count (unless ``num_steps`` is given), and the samplers of :func:`run_samplers`."""
    return evaluate(
        policy,
        prompts,
        reward,
        samplers=run_samplers(config, completed_epochs, sde_etas),
        num_steps=num_steps or config.eval.num_steps,
        guidance_scale=config.sample.guidance_scale,
        seed=config.eval.seed,
        batch_size=config.sample.batch_size,
        noise_schedule=config.sample.noise_schedule,
        images_out=images_out,
        progress=progress,
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


def gradient_signal_and_noise(gradients: torch.Tensor) -> tuple[float, float]:
    """``(|S|^2, E|N|^2)`` from ``n >= 2`` independent estimates ``[n, P]`` of one expected gradient ``S``, each
    ``S + N_i`` with zero-mean noise: the mean dot product of distinct pairs estimates ``|S|^2`` (unbiased; it can
    come out negative when the signal is small) and the mean squared norm less it ``E|N|^2``. An average of ``m``
    estimates then has squared signal-to-noise ``m |S|^2 / E|N|^2``; see ``scripts/gradient_agreement.py``."""
    if gradients.dim() != 2 or len(gradients) < 2:
        raise ValueError(f"gradients must be [n >= 2, P]; got shape {tuple(gradients.shape)}.")
    g = gradients.double()
    n, total = len(g), g.sum(dim=0)
    squares = (g**2).sum(dim=1)
    signal = ((total @ total - squares.sum()) / (n * (n - 1))).item()
    return signal, squares.mean().item() - signal
