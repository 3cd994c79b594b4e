"""Samplers with one stochasticity knob (eta) that return the log-probability of every step."""

from diffrl.sampling.common import StepOutput
from diffrl.sampling.flow import flow_step
from diffrl.sampling.gddim import gddim_step

__all__ = ["StepOutput", "flow_step", "gddim_step"]
