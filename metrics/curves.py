"""LUSD's success curves and the areas under them: CLIP-AUC, L1* and CLIP-I*.

LUSD (seed 003, Sec. 4.2) plots, for thresholds k >= 1, the ratio of edits with CLIP-R > k (the
success rate) and integrates it (CLIP-AUC); it plots the mean L1 and mean CLIP-I of the edits with
CLIP-R > k and integrates those over k in [1.0, 1.22] (L1*, CLIP-I*), where 1.22 is the largest k
leaving at least 30 edits for every method on MagicBrush. The reference code
(`sincostanx/LUSD:metrics.py`) uses the grid k = 1 + 0.01 i, i = 0..40 (1.00 .. 1.40), a strict
`clip_r > k`, and Simpson's rule (`scipy.integrate.simps`) over the grid points. The areas are not
divided by the interval width: a method whose every edit has CLIP-R > 1.4 gets CLIP-AUC = 0.40.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

LUSD_CLIP_R_MAX = 1.40  # the grid's last threshold in the reference code (41 points)
LUSD_CLIP_R_STEP = 0.01
LUSD_BACKGROUND_MAX = 1.22  # upper limit of the L1* / CLIP-I* integrals
LUSD_MIN_EXAMPLES = 30  # the paper chose 1.22 as the largest k keeping >= 30 edits per method


def clip_r_thresholds(stop: float = LUSD_CLIP_R_MAX, step: float = LUSD_CLIP_R_STEP, start: float = 1.0) -> list[float]:
    """The threshold grid k_i = start + step * i up to `stop` inclusive (LUSD: 1.00, 1.01, ..., 1.40)."""
    if step <= 0 or stop < start:
        raise ValueError(f"CLIP-R threshold grid needs step > 0 and stop >= start, got start={start} stop={stop} step={step}")
    count = round((stop - start) / step) + 1
    return [start + step * i for i in range(count)]


def simpson(y: Sequence[float], x: Sequence[float]) -> float:
    """Composite Simpson's rule on a uniform grid, as `scipy.integrate.simpson` computes it.

    Odd number of points N: (h/3) [y_0 + 4 y_1 + 2 y_2 + ... + 4 y_{N-2} + y_{N-1}] (this is also
    what LUSD's `scipy.integrate.simps` gave). Even N: Simpson over the first N-1 points plus the
    last interval integrated under the parabola through the last three points,
    h (5 y_{N-1} + 8 y_{N-2} - y_{N-3}) / 12. Two points: the trapezoid. One point: 0.
    """
    if len(y) != len(x):
        raise ValueError(f"simpson: {len(y)} values for {len(x)} grid points")
    n = len(x)
    if n < 2:
        return 0.0
    h = (x[-1] - x[0]) / (n - 1)
    if any(not math.isclose(x[i + 1] - x[i], h, rel_tol=1e-6, abs_tol=1e-12) for i in range(n - 1)):
        raise ValueError("simpson: the grid must be uniformly spaced")
    if n == 2:
        return h * (y[0] + y[1]) / 2
    odd_n = n if n % 2 == 1 else n - 1
    total = y[0] + y[odd_n - 1] + 4 * sum(y[1 : odd_n - 1 : 2]) + 2 * sum(y[2 : odd_n - 1 : 2])
    area = h * total / 3
    if odd_n != n:
        area += h * (5 * y[-1] + 8 * y[-2] - y[-3]) / 12
    return float(area)


def success_rate_curve(clip_r: Sequence[Optional[float]], thresholds: Sequence[float], total: Optional[int] = None) -> list[float]:
    """Success rate at each k: #{edits with CLIP-R > k} / total.

    `total` defaults to the number of edits; pass the number of attempted edits to count failed
    jobs (and edits whose CLIP-R is undefined, given as None) as unsuccessful.
    """
    total = len(clip_r) if total is None else total
    if total <= 0:
        raise ValueError("success rate: no edits to rate")
    values = [r for r in clip_r if r is not None]
    return [sum(1 for r in values if r > k) / total for k in thresholds]


def conditional_mean_curve(
    clip_r: Sequence[Optional[float]], values: Sequence[Optional[float]], thresholds: Sequence[float]
) -> tuple[list[Optional[float]], list[int]]:
    """Mean of `values` over the edits with CLIP-R > k, for each k, and how many edits that is.

    The mean is None where no edit passes (LUSD's pandas mean gives NaN there). Edits whose
    CLIP-R or value is None are left out.
    """
    if len(clip_r) != len(values):
        raise ValueError(f"conditional mean: {len(clip_r)} CLIP-R values for {len(values)} metric values")
    pairs = [(r, v) for r, v in zip(clip_r, values) if r is not None and v is not None]
    means: list[Optional[float]] = []
    counts: list[int] = []
    for k in thresholds:
        passing = [v for r, v in pairs if r > k]
        counts.append(len(passing))
        means.append(sum(passing) / len(passing) if passing else None)
    return means, counts


@dataclass
class AreaResult:
    """An area under a curve, or None with the reason it is undefined."""

    value: Optional[float]
    reason: Optional[str] = None
    min_count: Optional[int] = None  # fewest edits behind any point of the curve (L1*, CLIP-I*)
    warning: Optional[str] = None
    thresholds: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        out: dict = {"value": self.value}
        if self.reason:
            out["reason"] = self.reason
        if self.min_count is not None:
            out["min_count"] = self.min_count
        if self.warning:
            out["warning"] = self.warning
        if self.thresholds:
            out["k_range"] = [round(self.thresholds[0], 6), round(self.thresholds[-1], 6)]
        return out


def clip_auc(clip_r: Sequence[Optional[float]], thresholds: Sequence[float], total: Optional[int] = None) -> AreaResult:
    """CLIP-AUC = integral over k of the success rate #{CLIP-R > k} / total (Simpson on the grid)."""
    curve = success_rate_curve(clip_r, thresholds, total)
    return AreaResult(simpson(curve, thresholds), thresholds=list(thresholds))


def conditional_area(
    clip_r: Sequence[Optional[float]],
    values: Sequence[Optional[float]],
    thresholds: Sequence[float],
    k_max: float = LUSD_BACKGROUND_MAX,
    min_examples: int = LUSD_MIN_EXAMPLES,
    name: str = "area",
) -> AreaResult:
    """L1* / CLIP-I*: integral over k in [thresholds[0], k_max] of the mean metric of edits with CLIP-R > k.

    Undefined (value None, with the reason) when some k in the range has no passing edit: LUSD's
    NaN. A warning is attached when fewer than `min_examples` edits are behind some point.
    """
    grid = [k for k in thresholds if k <= k_max + 1e-9]
    if len(grid) < 2:
        return AreaResult(None, reason=f"{name}: the threshold grid has fewer than 2 points up to k_max={k_max}")
    means, counts = conditional_mean_curve(clip_r, values, grid)
    if any(m is None for m in means):
        first = next(k for k, m in zip(grid, means) if m is None)
        return AreaResult(
            None,
            reason=f"{name}: no edit has CLIP-R > {first:.2f} (the integral runs to k={k_max:.2f})",
            min_count=min(counts),
            thresholds=grid,
        )
    result = AreaResult(simpson(means, grid), min_count=min(counts), thresholds=grid)
    if min(counts) < min_examples:
        result.warning = (
            f"only {min(counts)} edits have CLIP-R > {grid[counts.index(min(counts))]:.2f}; "
            f"LUSD integrates only where every method keeps >= {min_examples}"
        )
    return result
