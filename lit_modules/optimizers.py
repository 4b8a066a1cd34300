"""The optimizers personalization offers, by config name, and the optional packages some of them need."""
from __future__ import annotations

import importlib.util
from typing import Any, Sequence

import torch

# name -> (package that must be importable, pip extra that installs it); None: a required dependency
OPTIMIZERS: dict[str, tuple[str, str] | None] = {
    "adamw": None,  # torch.optim.AdamW
    "adamw8bit": None,  # bitsandbytes AdamW8bit
    "lion": None,  # bitsandbytes Lion (32-bit states)
    "lion8bit": None,  # bitsandbytes Lion8bit
    "adafactor": None,  # transformers' Adafactor with a fixed lr (no relative step, no parameter scaling)
    "prodigy": ("prodigyopt", "prodigy"),  # prodigyopt.Prodigy: estimates the step size; use lr=1.0
}


def missing_optimizer_package(name: str) -> str | None:
    """An error message when optimizer `name` needs a package that is not installed, else None."""
    need = OPTIMIZERS.get(name)
    if need is None or importlib.util.find_spec(need[0]) is not None:
        return None
    return f"optimizer {name!r} needs the {need[0]} package (pip install 'dreamsteer[{need[1]}]', or pip install {need[0]})"


def make_optimizer(
    name: str, groups: Sequence[dict[str, Any]], betas: Sequence[float], weight_decay: float, eps: float
) -> torch.optim.Optimizer:
    """Optimizer `name` over parameter `groups` (each with its own ``lr``)."""
    missing = missing_optimizer_package(name)
    if missing:
        raise ImportError(missing)
    groups = list(groups)
    betas = tuple(float(b) for b in betas)
    if name == "adamw":
        return torch.optim.AdamW(groups, betas=betas, weight_decay=weight_decay, eps=eps)
    if name in ("adamw8bit", "lion", "lion8bit"):
        import bitsandbytes as bnb

        if name == "adamw8bit":
            return bnb.optim.AdamW8bit(groups, betas=betas, weight_decay=weight_decay, eps=eps)
        cls = bnb.optim.Lion8bit if name == "lion8bit" else bnb.optim.Lion
        return cls(groups, betas=betas, weight_decay=weight_decay)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, relative_step=False, scale_parameter=False, warmup_init=False, weight_decay=weight_decay)
    if name == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(groups, betas=betas, weight_decay=weight_decay, eps=eps)
    raise ValueError(f"unknown optimizer {name!r}: expected one of {list(OPTIMIZERS)}")
