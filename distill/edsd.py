"""Editability Driven Score Distillation (EDSD, DreamSteerer Sec. 4.1), framework-free.

EDSD turns the DDS-S delta score into a loss over the *personalized model's parameters* phi.
With ``x_t_src = sqrt(a_t) z_src + sqrt(1 - a_t) eps`` (the same ``t``, ``eps`` everywhere):

- ``target = stopgrad(eps_phi0(x_t_src, y_src))``: the pre-trained model on the source (the residual's
  target), and ``delta_target`` the same with CFG (``eps_hat_phi0``, the DDS-S source branch; default ``target``);
- ``d = eps_hat_phi(x_t_src, y_ref) - delta_target``: the DDS-S delta at the source (graph kept to phi);
- ``z_hat(phi) = z_src - eta * M * d``: one small DDS-S editing step on the source latent;
- ``x_hat_t(phi) = sqrt(a_t) z_hat(phi) + sqrt(1 - a_t) eps``;
- ``r = M * (eps_phi(stopgrad(x_hat_t), y_ref) - target)`` (``predict_ref`` decides plain eps or CFG);
- ``L = (||r||^2 + 2 J <stopgrad(M * r), x_hat_t(phi)>) / N`` (``N`` = number of elements of ``r``
  with ``reduction="mean"``, 1 with ``"sum"``).

The phi-gradient of ``L`` equals the gradient of the true loss ``||M * (eps_hat_phi(x_hat_t(phi)) -
target)||^2 / N`` with the UNet's input-Jacobian ``d eps / d x`` replaced by ``J * I``: the first
term differentiates eps_phi at a fixed input, the second carries ``2 (M r)^T J dx_hat/dphi``.
``J = -1`` is the paper's choice (Fig. 8); ``0`` drops the path through ``x_hat_t``, ``+1`` is the
ablation. Using ``M * r`` (not ``r``) in the second term keeps the identity exact for soft masks;
for the binary masks DreamSteerer uses the two are equal.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

JACOBIAN_CHOICES = (-1.0, 0.0, 1.0)
REDUCTIONS = ("mean", "sum")


@dataclass
class EDSDOutput:
    """The surrogate loss and the intermediate tensors (for logging and tests)."""

    loss: torch.Tensor  # the surrogate whose phi-gradient is the Jacobian-replaced gradient
    residual_norm: torch.Tensor  # ||r||^2 / N, detached: the value of the true loss
    delta: torch.Tensor  # d (graph kept)
    x_hat_t: torch.Tensor  # x_hat_t(phi) (graph kept)
    residual: torch.Tensor  # r (graph kept)


def check_jacobian(jacobian: float) -> float:
    """The Jacobian replacement factor J must be one of -1, 0, +1."""
    value = float(jacobian)
    if value not in JACOBIAN_CHOICES:
        raise ValueError(f"EDSD jacobian J={jacobian!r}: expected one of {JACOBIAN_CHOICES} (J * I replaces d eps/d x)")
    return value


def noised(z: torch.Tensor, eps: torch.Tensor, alpha_t: torch.Tensor) -> torch.Tensor:
    """``sqrt(a_t) z + sqrt(1 - a_t) eps`` with `alpha_t` broadcastable to `z` (shape [B] or scalar)."""
    a = alpha_t.to(z.dtype).reshape(-1, *([1] * (z.dim() - 1))) if alpha_t.dim() > 0 else alpha_t.to(z.dtype)
    return a.sqrt() * z + (1 - a).sqrt() * eps


def edsd_surrogate(residual: torch.Tensor, x_hat_t: torch.Tensor, mask: torch.Tensor | None, jacobian: float,
                   reduction: str = "mean") -> torch.Tensor:
    """``(||r||^2 + 2 J <stopgrad(M r), x_hat_t>) / N`` (see the module docstring)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"EDSD reduction {reduction!r}: expected one of {REDUCTIONS}")
    jacobian = check_jacobian(jacobian)
    loss = residual.pow(2).sum()
    if jacobian != 0.0:
        masked = residual if mask is None else mask * residual
        loss = loss + 2.0 * jacobian * (masked.detach() * x_hat_t).sum()
    return loss / residual.numel() if reduction == "mean" else loss


def edsd_loss(
    eps_ref_src: torch.Tensor,
    predict_ref: Callable[[torch.Tensor], torch.Tensor],
    target: torch.Tensor,
    z_src: torch.Tensor,
    eps: torch.Tensor,
    alpha_t: torch.Tensor,
    mask: torch.Tensor | None = None,
    eta: float = 0.1,
    jacobian: float = -1.0,
    reduction: str = "mean",
    delta_target: torch.Tensor | None = None,
) -> EDSDOutput:
    """The EDSD surrogate loss for one ``(t, eps)``.

    eps_ref_src: ``eps_hat_phi(x_t_src, y_ref)`` with its graph to phi (computed by the caller so it can
        share a UNet call with other terms); predict_ref: ``x -> eps_hat_phi(x, y_ref)`` (graph to phi);
    target: the pre-trained prediction the residual is measured against (detached here); delta_target: the
        pre-trained term of ``d`` (None: `target`); mask: ``M`` broadcastable to the latent or None (all ones);
        eta: step size of the single-step perturbation.
    """
    jacobian = check_jacobian(jacobian)
    target = target.detach()
    delta_target = target if delta_target is None else delta_target.detach()
    m = torch.ones_like(z_src) if mask is None else mask.to(z_src.dtype)
    delta = eps_ref_src - delta_target
    z_hat = z_src.detach() - eta * m * delta
    x_hat_t = noised(z_hat, eps, alpha_t)
    residual = m * (predict_ref(x_hat_t.detach()) - target)
    loss = edsd_surrogate(residual, x_hat_t, m, jacobian, reduction)
    norm = residual.detach().pow(2).sum()
    norm = norm / residual.numel() if reduction == "mean" else norm
    return EDSDOutput(loss=loss, residual_norm=norm, delta=delta, x_hat_t=x_hat_t, residual=residual)


def denoising_loss(eps_pred: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The standard diffusion loss ``mean ||eps_phi(z_t, y) - eps||^2`` (mode-shifting term), in float32 or wider."""
    dtype = torch.promote_types(eps_pred.dtype, torch.float32)
    return (eps_pred.to(dtype) - eps.to(dtype)).pow(2).mean()
