"""Sampling schedulers by name, built from a model's own noise-schedule config."""
from __future__ import annotations

from typing import Any

SCHEDULERS = ("ddim", "ddpm", "euler", "dpm")


def make_scheduler(name: str, config: Any):
    """A diffusers scheduler of kind `name` sharing the model's betas and prediction type."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    classes = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "euler": EulerDiscreteScheduler, "dpm": DPMSolverMultistepScheduler}
    if name not in classes:
        raise ValueError(f"unknown scheduler {name!r}: expected one of {list(SCHEDULERS)}")
    return classes[name].from_config(config)
