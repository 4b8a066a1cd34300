"""Region masks at latent resolution: boxes, mask images and Ground-A-Score's overlap rule.

Boxes are normalized ``[x0, y0, x1, y1]`` in [0, 1] on the source image *after* it is resized and
center-cropped to the model resolution (the image the editor sees, saved as ``<id>_source.png``).
A box becomes the latent rectangle ``round(x * w), round(y * h)`` (Ground-A-Score's rule: no SAM, no
dilation). A mask image is resized and cropped like the source, downsampled to the latent grid by
area averaging and thresholded at 0.5.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F


class MaskError(ValueError):
    """A box or mask that cannot be used; the message names it."""


@dataclass
class Region:
    """One subtask region at latent resolution: its mask ``[1, 1, h, w]`` and bounding box (latent px)."""

    mask: torch.Tensor
    box: tuple[int, int, int, int]
    area: float  # fraction of the image covered (the penalty's "small object" test)


def check_box(box: Sequence[float], what: str = "box") -> list[float]:
    """A normalized xyxy box: four numbers in [0, 1] with x0 < x1 and y0 < y1."""
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise MaskError(f"{what}: expected [x0, y0, x1, y1], got {box!r}")
    try:
        values = [float(v) for v in box]
    except (TypeError, ValueError):
        raise MaskError(f"{what}: expected four numbers, got {box!r}") from None
    if any(not 0.0 <= v <= 1.0 for v in values):
        raise MaskError(f"{what}: coordinates must lie in [0, 1] (normalized xyxy), got {values}")
    if values[2] <= values[0] or values[3] <= values[1]:
        raise MaskError(f"{what}: empty box {values} (needs x0 < x1 and y0 < y1)")
    return values


def box_region(box: Sequence[float], size: tuple[int, int], what: str = "box") -> Region:
    h, w = size
    x0, y0, x1, y1 = check_box(box, what)
    bx = (round(x0 * w), round(y0 * h), round(x1 * w), round(y1 * h))
    if bx[2] <= bx[0] or bx[3] <= bx[1]:
        raise MaskError(f"{what}: box {[x0, y0, x1, y1]} covers no latent pixel at {w}x{h}")
    mask = torch.zeros(1, 1, h, w)
    mask[..., bx[1] : bx[3], bx[0] : bx[2]] = 1.0
    return Region(mask, bx, (x1 - x0) * (y1 - y0))


def mask_region(image_mask: torch.Tensor, size: tuple[int, int], what: str = "mask") -> Region:
    """`image_mask`: ``[H, W]`` or ``[1, 1, H, W]`` in [0, 1] at the model resolution."""
    m = image_mask.float().reshape(1, 1, *image_mask.shape[-2:])
    m = (F.interpolate(m, size=size, mode="area") > 0.5).float()
    if m.sum() == 0:
        raise MaskError(f"{what}: the mask covers no latent pixel at {size[1]}x{size[0]}")
    ys, xs = torch.nonzero(m[0, 0], as_tuple=True)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    return Region(m, box, float(m.mean()))


def resolve_overlaps(masks: Sequence[torch.Tensor], overlap_value: float) -> list[torch.Tensor]:
    """Ground-A-Score's rule: where region i overlaps region j and j lies more inside the overlap
    (``|i & j| / |j| > |i & j| / |i|``, i.e. j is the smaller object), region i is set to `overlap_value`
    there, so the large region's edit does not overwrite the small object's."""
    binary = [m > 0 for m in masks]
    out = []
    for i, mi in enumerate(binary):
        m = masks[i].clone()
        for j, mj in enumerate(binary):
            if i == j:
                continue
            inter = mi & mj
            n = float(inter.sum())
            if n == 0:
                continue
            if n / float(mj.sum()) > n / float(mi.sum()):
                m[inter] = overlap_value
        out.append(m)
    return out


def union(masks: Sequence[torch.Tensor]) -> torch.Tensor:
    return (torch.stack([m > 0 for m in masks]).any(dim=0)).float()
