"""PatchNCE (CUT) loss on self-attention features, as CDS and Ground-A-Score use it.

For a reference feature map ``F_ref`` (detached) and the current one ``F`` (``[1, h, w, C]``), per
patch size ``p``: average-pool both by ``p`` (a side of 1 is not pooled), L2-normalize the channels,
pick ``n`` random positions shared by both maps, and with ``l_pos_i = <r_i, f_i>``,
``l_neg_ij = <r_i, f_j>`` (``l_neg_ii = -10``)

    loss_p = mean_i CE([l_pos_i, l_neg_i.] / tau, 0)

summed over patch sizes (and, by the callers, over layers). An optional box (at the layer's own
resolution) restricts both maps first (Ground-A-Score's preserved subtasks).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def to_grid(features: torch.Tensor) -> torch.Tensor:
    """``[1, HW, C]`` (square map) -> ``[1, h, w, C]``."""
    b, hw, c = features.shape
    side = int(round(hw**0.5))
    if side * side != hw:
        raise ValueError(f"PatchNCE expects square feature maps, got {hw} positions")
    return features.reshape(b, side, side, c)


def box_at(box: Sequence[int], latent_side: int, side: int) -> tuple[int, int, int, int]:
    """A latent-pixel box ``(x0, y0, x1, y1)`` scaled to a map of `side` pixels, at least 1 px wide."""
    scale = side / latent_side
    x0, y0, x1, y1 = (int(round(v * scale)) for v in box)
    x0, y0 = min(max(x0, 0), side - 1), min(max(y0, 0), side - 1)
    x1, y1 = max(min(x1, side), x0 + 1), max(min(y1, side), y0 + 1)
    return x0, y0, x1, y1


def patch_nce(reference: torch.Tensor, current: torch.Tensor, n_patches: int, patch_sizes: Sequence[int],
              tau: float, generator: torch.Generator) -> torch.Tensor:
    """The PatchNCE loss between two ``[1, h, w, C]`` maps (`reference` is detached here)."""
    ref = reference.detach().permute(0, 3, 1, 2).float()
    cur = current.permute(0, 3, 1, 2).float()
    loss = cur.new_zeros(())
    for p in patch_sizes:
        kernel = (min(p, ref.shape[2]), min(p, ref.shape[3]))
        r = F.avg_pool2d(ref, kernel) if kernel != (1, 1) else ref
        c = F.avg_pool2d(cur, kernel) if kernel != (1, 1) else cur
        r = F.normalize(r, dim=1).flatten(2)[0].t()  # [P, C]
        c = F.normalize(c, dim=1).flatten(2)[0].t()
        ids = torch.randperm(r.shape[0], generator=generator)[: min(n_patches, r.shape[0])].to(r.device)
        r, c = r[ids], c[ids]
        l_pos = (r * c).sum(dim=1, keepdim=True)
        l_neg = r @ c.t()
        l_neg = l_neg.masked_fill(torch.eye(len(ids), dtype=torch.bool, device=r.device), -10.0)
        logits = torch.cat([l_pos, l_neg], dim=1) / tau
        loss = loss + F.cross_entropy(logits, torch.zeros(len(ids), dtype=torch.long, device=r.device))
    return loss
