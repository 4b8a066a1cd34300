"""LUSD's plug-ins, usable over any delta method (LUSD Sec. 3.2-3.4, Alg. 1-2).

Given the method's raw delta ``e`` at step ``k`` of ``N``:

- filtering: resample the noise (same ``t``) while ``std(e) < eta``, ``eta <- decay * eta`` per
  rejection, ``eta`` reset to ``eta0`` every step (`GradientFilter`);
- attention mask: ``g = M_hat_k * e`` with ``M_hat_k = c_k M_k + (1 - c_k)``, ``c_k = k / (N - 1)`` and
  ``M_k = (1 - alpha) M_{k-1} + alpha M`` where ``M`` = min-max normalized ``A_S @ mean_e(A_C)`` of the
  previous accepted step's target branch (`AttentionMask`);
- L2 pull: ``g <- (1 - lambda) g + lambda (z - z_src)``;
- normalization: ``g <- gamma_k g / std(g)``, ``gamma_k = low + (high - low)(1 - sigmoid(s_k))``,
  ``s_k = linspace(-speed, speed, N)_k``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from dreamsteer.distill.attention import AttentionLayer, attention_apply
from dreamsteer.distill.scorer import Capture


def gamma_schedule(k: int, steps: int, low: float, high: float, speed: float) -> float:
    """LUSD's reverse-sigmoid step size: ``low + (high - low) (1 - sigmoid(linspace(-speed, speed, N)_k))``."""
    s = -speed + 2 * speed * k / (steps - 1) if steps > 1 else -speed
    return low + (high - low) * (1.0 - 1.0 / (1.0 + math.exp(-s)))


def mask_weight(k: int, steps: int) -> float:
    """``c_k``: linear from 0 at the first step to 1 at the last (the reference's linspace(0, 1, N))."""
    return k / (steps - 1) if steps > 1 else 1.0


def l2_pull(g: torch.Tensor, z: torch.Tensor, z_src: torch.Tensor, lam: float) -> torch.Tensor:
    return (1 - lam) * g + lam * (z.detach() - z_src)


def std_normalize(g: torch.Tensor, gamma: float) -> torch.Tensor:
    """``gamma * g / std(g)``; an all-zero ``g`` stays zero."""
    std = g.std()
    return g if float(std) == 0.0 else gamma * g / std


class GradientFilter:
    """Accept a raw delta when ``std(e) >= eta``; each rejection decays ``eta`` (reset per step)."""

    def __init__(self, eta0: float, decay: float, max_tries: int):
        self.eta0, self.decay, self.max_tries = eta0, decay, max_tries
        self.eta = eta0

    def reset(self) -> None:
        self.eta = self.eta0

    def accept(self, raw: torch.Tensor) -> bool:
        if float(raw.std()) >= self.eta:
            return True
        self.eta *= self.decay
        return False


def _side(hw: int) -> int:
    side = math.isqrt(hw)
    if side * side != hw:
        raise ValueError(f"attention mask expects square maps, got {hw} positions")
    return side


def attention_map(capture: Capture, cross: Sequence[AttentionLayer], self_layers: Sequence[AttentionLayer],
                  size: tuple[int, int], use_maps: bool = False) -> torch.Tensor:
    """LUSD's refined cross-attention ``A_S @ mean_e(A_C)``, min-max normalized, ``[1, 1, h, w]``.

    ``A_C`` (the recorded token columns, averaged over tokens, heads and the `cross` layers) is
    upsampled bicubically to each self-attention layer's resolution; ``A_S @ a`` is computed per
    layer by SDPA from the recorded queries and keys (or from materialized maps when `use_maps`),
    averaged over layers (at the largest self resolution) and upsampled bicubically to `size`.
    """
    grids = []
    for layer in cross:
        m = capture.cross_maps[layer.name].float().mean(dim=-1)  # [1, HW]
        side = _side(m.shape[-1])
        grids.append(m.reshape(1, 1, side, side))
    top = max(g.shape[-1] for g in grids)
    a = torch.stack([F.interpolate(g, size=(top, top), mode="bicubic", align_corners=False) if g.shape[-1] != top else g
                     for g in grids]).mean(dim=0)

    products = []
    for layer in self_layers:
        if use_maps:
            probs = capture.maps[layer.name].float()  # [1, HW, HW]
            side = _side(probs.shape[-1])
        else:
            q, k, scale = capture.qk[layer.name]
            side = _side(q.shape[2])
        value = a if a.shape[-1] == side else F.interpolate(a, size=(side, side), mode="bicubic", align_corners=False)
        value = value.flatten(2).transpose(1, 2)  # [1, HW, 1]
        out = probs @ value if use_maps else attention_apply(q.float(), k.float(), value, scale)
        products.append(out.transpose(1, 2).reshape(1, 1, side, side))
    top = max(p.shape[-1] for p in products)
    merged = torch.stack([F.interpolate(p, size=(top, top), mode="bicubic", align_corners=False) if p.shape[-1] != top else p
                          for p in products]).mean(dim=0)
    if merged.shape[-2:] != tuple(size):
        merged = F.interpolate(merged, size=tuple(size), mode="bicubic", align_corners=False)
    lo, hi = merged.amin(), merged.amax()
    normalized = (merged - lo) / (hi - lo) if float(hi - lo) > 0 else torch.ones_like(merged)
    return normalized.clamp(0, 1)


class AttentionMask:
    """LUSD's attention mask with EMA (Alg. 2): `update` after each accepted step, `modulate` at the next."""

    def __init__(self, cross: Sequence[AttentionLayer], self_layers: Sequence[AttentionLayer], alpha: float,
                 use_maps: bool = False):
        self.cross, self.self_layers, self.alpha, self.use_maps = list(cross), list(self_layers), alpha, use_maps
        self.mask: torch.Tensor | None = None  # M_k, [1, 1, h, w]

    def update(self, capture: Capture, size: tuple[int, int]) -> None:
        m = attention_map(capture, self.cross, self.self_layers, size, self.use_maps)
        self.mask = m if self.mask is None else (1 - self.alpha) * self.mask + self.alpha * m

    def modulate(self, g: torch.Tensor, k: int, steps: int) -> torch.Tensor:
        if self.mask is None:  # the first step: no map yet (and c_0 = 0)
            return g
        c = mask_weight(k, steps)
        return (c * self.mask.to(g.dtype) + (1 - c)) * g
