"""What the rectified-flow policies (FLUX.1, SD3) share: a schedule of sigmas ending at 0 and the flow step on it.

A flow model's sample at sigma ``t`` is ``x_t = (1 - t) x_0 + t noise`` and the network predicts the velocity
``noise - x_0``; a reverse step ``t -> s`` is :func:`~diffrl.sampling.flow.flow_step` (gDDIM-flow or Flow-GRPO's
SDE; eta = 0 is the pipelines' Euler step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffrl.sampling.common import StepOutput, per_sample
from diffrl.sampling.flow import flow_step


@dataclass(frozen=True)
class FlowSchedule:
    """``sigmas`` ``[T + 1]`` (ending at 0) on the host (the step maths reads them there, without a device
    synchronisation) and the scheduler's timesteps ``1000 sigmas[:T]`` on the device."""

    sigmas: torch.Tensor
    timesteps: torch.Tensor

    def __len__(self) -> int:
        return len(self.timesteps)


class FlowSteps:
    """``step`` and ``timestep_input`` of a policy whose ``schedule(num_steps)`` is a :class:`FlowSchedule`."""

    def schedule(self, num_steps: int) -> FlowSchedule:
        raise NotImplementedError

    def step(
        self,
        model_output: torch.Tensor,
        num_steps: int,
        step_index: int | torch.Tensor,
        latents: torch.Tensor,
        *,
        eta: float,
        noise_schedule: str = "gddim",
        generator: list[torch.Generator] | torch.Generator | None = None,
        prev_sample: torch.Tensor | None = None,
        log_prob_reduction: str = "mean",
    ) -> StepOutput:
        """One reverse step at ``step_index`` (scalar or ``[B]``): sigma ``t -> s`` of the ``num_steps`` schedule."""
        sigmas = self.schedule(num_steps).sigmas
        index = torch.as_tensor(step_index).cpu()  # host indices (the trainers keep them there): no device sync
        return flow_step(
            model_output,
            sigmas[index],
            sigmas[index + 1],
            latents,
            eta=eta,
            noise_schedule=noise_schedule,
            generator=generator,
            prev_sample=prev_sample,
            log_prob_reduction=log_prob_reduction,
        )

    def _sigma(self, num_steps: int, step_index: int | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Sigma ``t`` of step ``step_index`` (scalar or ``[B]``), broadcastable against ``like``, float32."""
        return per_sample(self.schedule(num_steps).sigmas[torch.as_tensor(step_index).cpu()], like)

    def noised(
        self, x0: torch.Tensor, num_steps: int, step_index: int | torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """The forward process's sample at step ``step_index``'s sigma ``t`` (scalar or ``[B]``):
        ``(1 - t) x0 + t noise``."""
        t = self._sigma(num_steps, step_index, x0).to(x0.dtype)
        return (1 - t) * x0 + t * noise

    def predicted_clean(
        self, model_output: torch.Tensor, num_steps: int, step_index: int | torch.Tensor, latents: torch.Tensor
    ) -> torch.Tensor:
        """The clean sample the velocity ``model_output`` at ``latents`` predicts: ``x_t - t v`` (float32)."""
        return latents.float() - self._sigma(num_steps, step_index, latents) * model_output.float()

    def timestep_input(self, num_steps: int, step_index: int | torch.Tensor) -> torch.Tensor:
        """The scheduler's timestep (1000 sigma) for ``step_index`` (scalar or ``[B]``)."""
        return self.schedule(num_steps).timesteps[torch.as_tensor(step_index, device=self.device)]
