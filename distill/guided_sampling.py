"""Spatial-feature guided DDIM sampling (DreamSteerer's mode-shifting images, Sec. 4.2, as reconstructed).

The personalized model generates its concept, steered toward the *layout of the source image* by the
energy of self-attention features of chosen decoder layers:

    E(x_t) = sum_l || F_l(x_t) - F_l(x_t_src) ||^2,   x_t_src = sqrt(a_t) z_src + sqrt(1 - a_t) x_T,

where ``x_T`` is the sample's own initial noise (the source is noised with the same noise) and ``F_l``
is the output of self-attention layer ``l`` (after ``to_out``) on the conditional prompt. During the
early (layout) part of sampling, steps ``i`` with ``start <= i / N < end``, each DDIM step first moves

    x_t <- x_t - w_t * grad_x E(x_t),

with ``w_t = weight`` (``normalize="none"``) or ``w_t = weight * sqrt(1 - a_t) / rms(grad_x E)``
(``normalize="rms"``, per sample: the step is a fixed fraction of the noise level whatever the model's
feature scale), then takes an ordinary classifier-free-guided DDIM step.

Every move lowers the energy it targets (backtracking): a sample's move ``x_t - s w_t grad E`` is taken
with the largest ``s`` in ``1, 1/2, 1/4, ...`` (at most ``backtracks`` halvings) for which
``E(x_t - s w_t grad E) < E(x_t)`` (same ``t``, same ``x_t_src``); a sample whose energy falls for none
of them does not move. Near ``t = T`` the sample and the noised source share almost all their noise,
``E`` is near its minimum, and a fixed-size normalized step would raise it (at the defaults 0.45 -> 32 on
the first move); there the rule shrinks or skips the move. Each trial costs one UNet call without gradient.

Guidance modes are a registry (`GUIDANCE_MODES`): ``"features"`` is the above, ``"none"`` plain DDIM.
Another mode (e.g. GLIGEN boxes) registers a builder returning a `Guidance`; its `unet_kwargs` are passed
to every denoising UNet call.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import torch

from dreamsteer.distill.attention import AttentionLayer, AttentionRecorder, list_attention_layers, select_layers

NORMALIZATIONS = ("rms", "none")


class Guidance(Protocol):
    """A sampling guidance: may move ``x_t`` before each DDIM step and add UNet keyword arguments."""

    unet_kwargs: dict[str, Any]

    def guide(self, x_t: torch.Tensor, t: torch.Tensor, step: int, num_steps: int) -> torch.Tensor:
        ...


def cfg_eps(backbone, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None,
            scale: float, **unet_kwargs: Any) -> torch.Tensor:
    """``eps(x, null) + scale * (eps(x, y) - eps(x, null))`` in one batched UNet call (one call of the
    conditional branch alone when ``scale == 1`` or no null embedding is given)."""
    b = x.shape[0]
    cond = cond.expand(b, -1, -1) if cond.shape[0] == 1 else cond
    if scale == 1.0 or uncond is None:
        return backbone.predict_eps(x, t, cond, **unet_kwargs)
    uncond = uncond.expand(b, -1, -1) if uncond.shape[0] == 1 else uncond
    t2 = t.reshape(-1).expand(b) if t.numel() in (1, b) else t
    out = backbone.predict_eps(torch.cat([x, x]), torch.cat([t2, t2]), torch.cat([uncond, cond]), **unet_kwargs)
    e_uncond, e_cond = out.chunk(2)
    return e_uncond + scale * (e_cond - e_uncond)


def feature_layers(unet: torch.nn.Module, places: Sequence[str] = ("up",), divisors: Sequence[int] | None = (2, 4)) -> list[AttentionLayer]:
    """The self-attention layers whose outputs define the feature energy."""
    return select_layers(list_attention_layers(unet), "self", tuple(places), None if divisors is None else tuple(divisors))


def feature_energy(backbone, x_t: torch.Tensor, x_t_src: torch.Tensor, t: torch.Tensor, emb: torch.Tensor,
                   layers: Sequence[AttentionLayer], source_emb: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample ``E_b = sum_l ||F_l(x_t)_b - F_l(x_t_src)_b||^2`` (``[B]``; graph kept to `x_t`).

    One UNet call on ``[x_t, x_t_src]``; the source half is detached.
    """
    b = x_t.shape[0]
    emb = emb.expand(b, -1, -1) if emb.shape[0] == 1 else emb
    src = emb if source_emb is None else (source_emb.expand(b, -1, -1) if source_emb.shape[0] == 1 else source_emb)
    tt = t.reshape(-1).expand(b) if t.numel() == 1 else t
    with AttentionRecorder(backbone.unet, features=layers) as rec:
        backbone.predict_eps(torch.cat([x_t, x_t_src.detach()]), torch.cat([tt, tt]), torch.cat([emb, src]))
        energy = x_t.new_zeros(b)
        for layer in layers:
            feats = rec.features[layer.name]
            energy = energy + (feats[:b] - feats[b:].detach()).pow(2).flatten(1).sum(dim=1).to(energy.dtype)
    return energy


@dataclass
class Move:
    """One guidance move of a batch: per-sample ``E`` before and after it, and the step fraction ``s``
    taken (0: the sample did not move)."""

    step: int
    before: torch.Tensor
    after: torch.Tensor
    scale: torch.Tensor


@dataclass
class FeatureGuidance:
    """Energy guidance toward the source's self-attention features (see the module docstring)."""

    backbone: Any
    z_src: torch.Tensor  # [1, C, h, w]
    noise: torch.Tensor  # [B, C, h, w]: each sample's x_T
    emb: torch.Tensor  # conditional prompt embedding [1 or B, L, D]
    layers: Sequence[AttentionLayer]
    weight: float = 0.5
    start: float = 0.0
    end: float = 0.5
    normalize: str = "rms"
    iters: int = 1
    backtracks: int = 8  # halvings of a move that does not lower E before the sample stays put
    source_emb: torch.Tensor | None = None  # the source branch's prompt (default: `emb`)
    unet_kwargs: dict[str, Any] = field(default_factory=dict)
    moves: list[Move] = field(default_factory=list)  # every guidance move, for logging and tests

    def __post_init__(self) -> None:
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"feature guidance normalize {self.normalize!r}: expected one of {NORMALIZATIONS}")
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise ValueError(f"feature guidance window [{self.start}, {self.end}): expected 0 <= start <= end <= 1")
        if self.weight < 0 or self.iters < 1 or self.backtracks < 0:
            raise ValueError(f"feature guidance weight {self.weight} / iters {self.iters} / backtracks {self.backtracks}: "
                             "expected weight >= 0, iters >= 1, backtracks >= 0")

    def active(self, step: int, num_steps: int) -> bool:
        return self.weight > 0 and self.start <= step / num_steps < self.end

    def source_at(self, t: torch.Tensor) -> torch.Tensor:
        a = self.backbone.alphas_cumprod[t.long().reshape(-1)[:1]].reshape(1, 1, 1, 1).to(self.noise.dtype)
        return a.sqrt() * self.z_src + (1 - a).sqrt() * self.noise

    def energy(self, x_t: torch.Tensor, x_t_src: torch.Tensor, t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``E`` of the samples `rows` (`x_t` holds those rows only) against their own noised source."""
        def pick(emb: torch.Tensor | None) -> torch.Tensor | None:
            return emb if emb is None or emb.shape[0] == 1 else emb[rows]

        return feature_energy(self.backbone, x_t, x_t_src[rows], t, pick(self.emb), self.layers, pick(self.source_emb))

    def guide(self, x_t: torch.Tensor, t: torch.Tensor, step: int, num_steps: int) -> torch.Tensor:
        if not self.active(step, num_steps):
            return x_t
        x_t_src = self.source_at(t).to(x_t.dtype)
        sigma = (1 - self.backbone.alphas_cumprod[t.long().reshape(-1)[:1]]).sqrt().to(x_t.dtype)
        every = torch.arange(x_t.shape[0], device=x_t.device)
        for _ in range(self.iters):
            x = x_t.detach().requires_grad_(True)
            with torch.enable_grad():
                energy = self.energy(x, x_t_src, t, every)
                (grad,) = torch.autograd.grad(energy.sum(), [x])
            if self.normalize == "rms":
                rms = grad.pow(2).flatten(1).mean(dim=1).sqrt().clamp_min(1e-12).reshape(-1, 1, 1, 1)
                direction = self.weight * sigma * grad / rms
            else:
                direction = self.weight * grad
            x_t, move = self.backtrack(x_t.detach(), direction, energy.detach(), x_t_src, t)
            self.moves.append(Move(step, *move))
        return x_t

    @torch.no_grad()
    def backtrack(self, x_t: torch.Tensor, direction: torch.Tensor, energy: torch.Tensor, x_t_src: torch.Tensor,
                  t: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``x_t - s direction`` per sample with the largest ``s`` in ``1, 1/2, ...`` (``backtracks`` halvings)
        that lowers ``E``, else ``s = 0``. Returns the moved ``x_t`` and ``(E before, E after, s)``."""
        scale = torch.zeros_like(energy)
        after = energy.clone()
        pending = torch.ones_like(energy, dtype=torch.bool)
        trial = 1.0
        for _ in range(self.backtracks + 1):
            rows = pending.nonzero().flatten()
            moved = self.energy(x_t[rows] - trial * direction[rows], x_t_src, t, rows)
            lower = moved < energy[rows]
            scale[rows[lower]] = trial
            after[rows[lower]] = moved[lower]
            pending[rows[lower]] = False
            if not pending.any():
                break
            trial /= 2
        return x_t - scale.reshape(-1, 1, 1, 1).to(x_t.dtype) * direction, (energy, after, scale)


def build_feature_guidance(backbone, z_src: torch.Tensor, noise: torch.Tensor, emb: torch.Tensor, options: dict[str, Any]) -> FeatureGuidance:
    """`FeatureGuidance` from a plain dict of options (keys: weight, start, end, normalize, iters, backtracks,
    places, divisors, source_emb)."""
    options = dict(options)
    layers = feature_layers(backbone.unet, options.pop("places", ("up",)), options.pop("divisors", (2, 4)))
    return FeatureGuidance(backbone, z_src, noise, emb, layers, **options)


# mode name -> builder(backbone, z_src, noise, emb, options) -> Guidance, or None for plain DDIM
GUIDANCE_MODES: dict[str, Callable[..., Guidance] | None] = {
    "features": build_feature_guidance,
    "none": None,
}


def make_guidance(mode: str, backbone, z_src: torch.Tensor, noise: torch.Tensor, emb: torch.Tensor,
                  options: dict[str, Any]) -> Guidance | None:
    if mode not in GUIDANCE_MODES:
        raise ValueError(f"guidance mode {mode!r}: expected one of {sorted(GUIDANCE_MODES)}")
    builder = GUIDANCE_MODES[mode]
    return None if builder is None else builder(backbone, z_src, noise, emb, options)


@torch.no_grad()
def ddim_sample(
    backbone,
    noise: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    num_steps: int = 20,
    guidance_scale: float = 7.5,
    guidance: Guidance | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) from `noise` with classifier-free guidance; `guidance` may move
    ``x_t`` before each step. Returns the final latents ``[B, C, h, w]``."""
    from diffusers import DDIMScheduler
    from tqdm.auto import tqdm

    if num_steps < 1:
        raise ValueError(f"DDIM steps {num_steps}: expected >= 1")
    # predict_eps already returns eps for v-prediction models, so the scheduler works in eps.
    scheduler = DDIMScheduler.from_config(backbone.scheduler.config, prediction_type="epsilon")
    scheduler.set_timesteps(num_steps, device=backbone.device)
    x = noise.to(backbone.device, backbone.dtype) * scheduler.init_noise_sigma
    unet_kwargs = guidance.unet_kwargs if guidance is not None else {}
    for i, t in enumerate(tqdm(scheduler.timesteps, desc="guided sampling", disable=not progress, leave=False)):
        tt = t.reshape(1).to(backbone.device)
        if guidance is not None:
            x = guidance.guide(x, tt, i, num_steps)
        eps = cfg_eps(backbone, x, tt, cond, uncond, guidance_scale, **unet_kwargs)
        x = scheduler.step(eps, t, x).prev_sample
    return x
