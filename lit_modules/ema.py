"""Exponential moving average of a set of named trainable parameters."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
from torch import nn


class ParameterEMA:
    """EMA of named parameters, updated after each optimizer step::

        e_0 = w_0,    e_n = d_n e_{n-1} + (1 - d_n) w_n,
        d_n = min(decay, (1 + n) / (10 + n)) with warmup (diffusers' EMAModel), else decay.

    The averages are fp32 tensors on the parameters' device; ``state_dict`` holds them and ``n``.
    """

    def __init__(self, named: Sequence[tuple[str, nn.Parameter]], decay: float, warmup: bool = True):
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.updates = 0
        self.shadow = {name: p.detach().float().clone() for name, p in named}

    def current_decay(self) -> float:
        """``d_n`` of the next update ``n = updates + 1``."""
        n = self.updates + 1
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, named: Sequence[tuple[str, nn.Parameter]]) -> None:
        d = self.current_decay()
        for name, p in named:
            shadow = self.shadow[name]
            if shadow.device != p.device:  # follows the model to its device once
                shadow = self.shadow[name] = shadow.to(p.device)
            shadow.mul_(d).add_(p.detach().float(), alpha=1 - d)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict[str, Any], where: str) -> None:
        """Restore `state` (from ``state_dict``); `where` names its source in errors."""
        shadow = state.get("shadow", {}) if isinstance(state, dict) else {}
        if set(shadow) != set(self.shadow):
            raise ValueError(f"{where}: the EMA state does not hold this adapter's trainable parameters (was it written with the same config?)")
        for name, value in shadow.items():
            if value.shape != self.shadow[name].shape:
                raise ValueError(f"{where}: EMA tensor {name} has shape {tuple(value.shape)}, expected {tuple(self.shadow[name].shape)}")
            self.shadow[name] = value.float().to(self.shadow[name].device)
        self.updates = int(state["updates"])

    @contextlib.contextmanager
    def swapped_in(self, named: Sequence[tuple[str, nn.Parameter]]) -> Iterator[None]:
        """Inside: the parameters hold the averages; on exit their own values come back (bit-exact)."""
        raw = {}
        with torch.no_grad():
            for name, p in named:
                raw[name] = p.detach().clone()
                p.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in named:
                    p.copy_(raw[name])
