"""Score-distillation edit methods: one small class each, ``step(z, draw, ctx) -> StepOut``.

Notation: ``z_t = sqrt(a_t) z + sqrt(1 - a_t) eps`` (same ``t``, ``eps`` for every branch of a term),
``eps_hat_w(x, y) = eps(x, null) + w (eps(x, y) - eps(x, null))`` (``w = 1`` skips the null branch),
``w(t)`` = 1 or ``1 - a_t`` (`weighting`). Each step returns the method's gradient on ``z`` (``raw``,
before the LUSD plug-ins and the loss scale), an optional extra gradient (PatchNCE terms, added as
is) and the attention capture of its target branch. A step is deterministic for a given `Draw`
(timesteps, noises and the seed of the PatchNCE position sampling).

All noise predictions of a step go through one `Scorer` call (split only by adapter state, by
``max_batch``, and for the PatchNCE pass, which needs autograd through the UNet).
"""
from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from dreamsteer.distill.attention import AttentionLayer
from dreamsteer.distill.config import EditorConfig
from dreamsteer.distill.masks import Region, resolve_overlaps, union
from dreamsteer.distill.patchnce import box_at, patch_nce, to_grid
from dreamsteer.distill.scorer import Capture, ScoreRequest, Scorer, Scores


@dataclass
class Draw:
    """The randomness of one evaluation: timesteps ``[m]``, noises ``[n, C, h, w]``, PatchNCE seeds ``[m]``."""

    t: torch.Tensor
    eps: torch.Tensor
    seeds: torch.Tensor


@dataclass
class StepOut:
    raw: torch.Tensor  # [1, C, h, w] the method's gradient g (z.grad = scale * plug-ins(g) + extra)
    extra: torch.Tensor | None = None
    capture: Capture | None = None  # the target branch's attention (for the attention-mask plug-in)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Subtask:
    """A Ground-A-Score subtask: edit `source` -> `target` inside `region`; `preserve` adds box PatchNCE."""

    source: str
    target: str
    region: Region
    preserve: bool = False


class EditContext:
    """What every step needs: the backbone, scorer, source latent, prompts and cached embeddings."""

    def __init__(self, backbone, scorer: Scorer, z_src: torch.Tensor, source_prompt: str, target_prompt: str,
                 subtasks: Sequence[Subtask] = (), subject_mask: torch.Tensor | None = None,
                 cut_layers: Sequence[AttentionLayer] = ()):
        self.backbone = backbone
        self.scorer = scorer
        self.z_src = z_src
        self.source_prompt = source_prompt
        self.target_prompt = target_prompt
        self.subtasks = list(subtasks)
        self.subject_mask = subject_mask
        self.cut_layers = list(cut_layers)
        self._emb: dict[tuple[str, bool], torch.Tensor] = {}

    def embed(self, prompt: str, pretrained: bool = False) -> torch.Tensor:
        """``[1, L, D]`` embedding of `prompt`; with `pretrained`, encoded with the adapter disabled."""
        pretrained = pretrained and self.scorer.adapter_matters()
        key = (prompt, pretrained)
        if key not in self._emb:
            bb = self.backbone
            with torch.no_grad(), (bb.adapter_disabled() if pretrained else contextlib.nullcontext()):
                self._emb[key] = bb.encode_prompt([prompt])
        return self._emb[key]


def weight(cfg: EditorConfig, backbone, t: torch.Tensor) -> torch.Tensor:
    """``w(t)`` as a ``[1, 1, 1, 1]`` tensor."""
    if cfg.weighting == "one_minus_alpha":
        return (1 - backbone.alphas_cumprod[t.long()]).reshape(-1, 1, 1, 1)
    return torch.ones(1, 1, 1, 1, device=backbone.device)


class _Guided:
    """Request indices of one CFG-guided prediction: ``eps_hat_w(latent, y)``."""

    def __init__(self, requests: list[ScoreRequest], latent, t, emb, null, guidance: float, pretrained: bool = False,
                 record: bool = False):
        self.guidance = guidance
        self.null = None
        if guidance != 1.0:
            self.null = len(requests)
            requests.append(ScoreRequest(latent, t, null, pretrained))
        self.cond = len(requests)
        requests.append(ScoreRequest(latent, t, emb, pretrained, record))

    def value(self, scores: Scores) -> torch.Tensor:
        cond = scores.eps[self.cond]
        if self.null is None:
            return cond
        null = scores.eps[self.null]
        return null + self.guidance * (cond - null)


class Method(abc.ABC):
    """Base class: default sampling ``t ~ U{t_min..t_max}``, ``eps ~ N(0, I)``; one unit per iteration."""

    name = "base"
    supports_attention_mask = True

    def __init__(self, cfg: EditorConfig, backbone=None):
        self.cfg = cfg

    def units(self, ctx: EditContext) -> list[Any]:
        """The optimizer steps of one iteration (Ground-A-Score's sequential mode has several)."""
        return [None]

    def terms(self, ctx: EditContext, unit: Any) -> int:
        return 1

    def sample(self, gen: torch.Generator, ctx: EditContext, unit: Any = None) -> Draw:
        m = self.terms(ctx, unit)
        t = self.sample_t(gen, m)
        return self.sample_noise(gen, ctx, unit, t)

    def sample_t(self, gen: torch.Generator, m: int) -> torch.Tensor:
        return torch.randint(self.cfg.t_min, self.cfg.t_max + 1, (m,), generator=gen)

    def sample_noise(self, gen: torch.Generator, ctx: EditContext, unit: Any, t: torch.Tensor) -> Draw:
        m = self.terms(ctx, unit)
        eps = torch.randn((m, *ctx.z_src.shape[1:]), generator=gen)
        seeds = torch.randint(0, 2**31 - 1, (m,), generator=gen)
        return Draw(t, eps, seeds)

    def resample(self, draw: Draw, gen: torch.Generator, ctx: EditContext, unit: Any, resample_t: bool) -> Draw:
        """A new draw for the gradient filter: new noise, the same t unless `resample_t`."""
        t = self.sample_t(gen, len(draw.t)) if resample_t else draw.t
        return self.sample_noise(gen, ctx, unit, t)

    @abc.abstractmethod
    def step(self, z: torch.Tensor, draw: Draw, ctx: EditContext, unit: Any = None, record: bool = False) -> StepOut:
        """The method's gradient for `draw` at `z` (`record`: capture the target branch's attention)."""


def _on(draw: Draw, ctx: EditContext) -> tuple[torch.Tensor, torch.Tensor]:
    device = ctx.backbone.device
    return draw.t.to(device), draw.eps.to(device, ctx.z_src.dtype)


class SDS(Method):
    """SDS (Poole et al.): ``g = w(t) (eps_hat_w(z_t, y_tgt) - eps)``."""

    name = "sds"

    def step(self, z, draw, ctx, unit=None, record=False):
        bb, cfg = ctx.backbone, self.cfg
        t, eps = _on(draw, ctx)
        z_t = bb.add_noise(z.detach(), eps, t)
        requests: list[ScoreRequest] = []
        tgt = _Guided(requests, z_t, t, ctx.embed(ctx.target_prompt), ctx.embed(""), cfg.guidance, record=record)
        scores = ctx.scorer(requests)
        raw = weight(cfg, bb, t) * (tgt.value(scores) - eps)
        return StepOut(raw, capture=scores.captures.get(tgt.cond))


class DDS(Method):
    """DDS (Hertz et al.): ``g = M * w(t) (eps_hat_w(z_t, y_tgt) - eps_hat_w(z_t_src, y_src))``.

    DDS-S: the source branch (and its null branch) runs on the pre-trained model (adapter disabled),
    the target branch on the personalized one (DreamSteerer's source score bias correction).
    DDS-SM: DDS-S times the subject mask ``M`` (``ctx.subject_mask``); plain DDS has ``M = 1``.
    """

    name = "dds"

    def guided_delta(self, z, t, eps, ctx, record: bool, record_source: bool = False):
        bb, cfg = ctx.backbone, self.cfg
        pre = bool(getattr(cfg, "source_pretrained", False))
        z_t = bb.add_noise(z.detach(), eps, t)
        z_t_src = bb.add_noise(ctx.z_src, eps, t)
        requests: list[ScoreRequest] = []
        src = _Guided(requests, z_t_src, t, ctx.embed(ctx.source_prompt, pre), ctx.embed("", pre), cfg.guidance, pre,
                      record=record_source)
        tgt = _Guided(requests, z_t, t, ctx.embed(ctx.target_prompt), ctx.embed(""), cfg.guidance, record=record)
        scores = ctx.scorer(requests)
        delta = weight(cfg, bb, t) * (tgt.value(scores) - src.value(scores))
        return delta, scores, src, tgt

    def step(self, z, draw, ctx, unit=None, record=False):
        t, eps = _on(draw, ctx)
        raw, scores, _, tgt = self.guided_delta(z, t, eps, ctx, record)
        if ctx.subject_mask is not None:
            raw = ctx.subject_mask.to(raw) * raw
        return StepOut(raw, capture=scores.captures.get(tgt.cond))


def cut_loss(reference: dict[str, torch.Tensor], current: dict[str, torch.Tensor], layers: Sequence[AttentionLayer],
             cfg, seed: int, box: Sequence[int] | None = None, latent_side: int = 0) -> torch.Tensor:
    """Sum over `layers` of PatchNCE(reference, current), optionally inside a latent-pixel `box`."""
    gen = torch.Generator().manual_seed(int(seed))
    total = None
    for layer in layers:
        ref, cur = to_grid(reference[layer.name]), to_grid(current[layer.name])
        if box is not None:
            x0, y0, x1, y1 = box_at(box, latent_side, ref.shape[1])
            ref, cur = ref[:, y0:y1, x0:x1], cur[:, y0:y1, x0:x1]
        loss = patch_nce(ref, cur, cfg.n_patches, cfg.patch_sizes, cfg.nce_tau, gen)
        total = loss if total is None else total + loss
    assert total is not None
    return total


class CDS(DDS):
    """CDS (Nam et al.): ``w_dds * g_DDS`` plus ``w_cut * d PatchNCE / d z`` between the self-attention
    features of the conditional source branch (detached) and of a second pass ``eps(z_t, y_tgt)`` with
    autograd through the UNet (same ``t``, ``eps``)."""

    name = "cds"

    def step(self, z, draw, ctx, unit=None, record=False):
        cfg = self.cfg
        t, eps = _on(draw, ctx)
        delta, scores, src, tgt = self.guided_delta(z, t, eps, ctx, record, record_source=True)
        reference = scores.captures[src.cond].features
        with torch.enable_grad():
            leaf = z.detach().requires_grad_(True)
            z_t = ctx.backbone.add_noise(leaf, eps, t)
            second = ctx.scorer([ScoreRequest(z_t, t, ctx.embed(ctx.target_prompt), record=True)])
            loss = cut_loss(reference, second.captures[0].features, ctx.cut_layers, cfg, int(draw.seeds[0]))
            (grad,) = torch.autograd.grad(loss, leaf)
        return StepOut(cfg.w_dds * delta, extra=cfg.w_cut * grad, capture=scores.captures.get(tgt.cond),
                       info={"cut_loss": float(loss.detach())})


class SBP(Method):
    """SBP (McAllister et al.): ``g = w(t) (eps_hat_w(z_t, y_tgt) - eps_hat_w(z_t, y_src))``, both on the
    current ``z_t``; the null branches cancel, so ``g = w(t) * w * (eps(z_t, y_tgt) - eps(z_t, y_src))``.
    LUSD is SBP with ``w = 1``, ``w(t) = 1`` and the plug-ins on."""

    name = "sbp"

    def step(self, z, draw, ctx, unit=None, record=False):
        bb, cfg = ctx.backbone, self.cfg
        t, eps = _on(draw, ctx)
        z_t = bb.add_noise(z.detach(), eps, t)
        requests = [ScoreRequest(z_t, t, ctx.embed(ctx.source_prompt)),
                    ScoreRequest(z_t, t, ctx.embed(ctx.target_prompt), record=record)]
        scores = ctx.scorer(requests)
        raw = weight(cfg, bb, t) * cfg.guidance * (scores.eps[1] - scores.eps[0])
        return StepOut(raw, capture=scores.captures.get(1))


class PDS(Method):
    """PDS (Koo et al.): ``g = zeta_tgt - zeta_src`` with ``zeta = (x_{t'} - mu(x_t, y)) / sigma_t``.

    ``x_t`` / ``x_{t'}`` noise ``z`` (target) or ``z_src`` (source) with the shared noises ``eps`` / ``eps'``;
    ``mu = c0 x0_hat + c1 x_t``, ``x0_hat = (x_t - sqrt(1 - a_t) eps_hat_w) / sqrt(a_t)``,
    ``c0 = sqrt(a_t') beta_t / (1 - a_t)``, ``c1 = sqrt(alpha_t) (1 - a_t') / (1 - a_t)``,
    ``sigma_t = sqrt((1 - a_t') / (1 - a_t) beta_t)``. ``t`` is drawn from the timesteps of a DDIM scheduler
    built from the model's scheduler config and set to `pds_grid` steps (indices in [min_ratio, max_ratio)
    of the ascending grid, as the reference), ``t'`` is the grid step before it -- whatever the config's
    ``timestep_spacing`` (leading, trailing, linspace) and ``steps_offset``.
    """

    name = "pds"

    def __init__(self, cfg: EditorConfig, backbone=None):
        from diffusers import DDIMScheduler

        super().__init__(cfg, backbone)
        if backbone is None:
            raise ValueError("PDS needs the backbone: its timestep grid comes from the model's scheduler")
        grid = DDIMScheduler.from_config(backbone.scheduler.config)
        grid.set_timesteps(cfg.pds_grid)
        self.grid = grid.timesteps.flip(0).long().cpu()  # ascending

    def sample_t(self, gen, m):
        cfg = self.cfg
        lo = max(1, int(cfg.pds_grid * cfg.pds_min_ratio))
        hi = max(lo + 1, int(cfg.pds_grid * cfg.pds_max_ratio))
        idx = torch.randint(lo, hi, (1,), generator=gen)
        return torch.cat([self.grid[idx], self.grid[idx - 1]])

    def sample_noise(self, gen, ctx, unit, t):
        eps = torch.randn((2, *ctx.z_src.shape[1:]), generator=gen)
        return Draw(t, eps, torch.randint(0, 2**31 - 1, (1,), generator=gen))

    def step(self, z, draw, ctx, unit=None, record=False):
        bb, cfg = ctx.backbone, self.cfg
        t_all, eps_all = _on(draw, ctx)
        t, t_prev = t_all[:1], t_all[1:2]
        eps, eps_prev = eps_all[:1], eps_all[1:2]
        z = z.detach()
        x_t, x_t_src = bb.add_noise(z, eps, t), bb.add_noise(ctx.z_src, eps, t)
        requests: list[ScoreRequest] = []
        src = _Guided(requests, x_t_src, t, ctx.embed(ctx.source_prompt), ctx.embed(""), cfg.guidance)
        tgt = _Guided(requests, x_t, t, ctx.embed(ctx.target_prompt), ctx.embed(""), cfg.guidance, record=record)
        scores = ctx.scorer(requests)
        sched = bb.scheduler
        beta_t = sched.betas[t.cpu()].to(z).reshape(1, 1, 1, 1)
        alpha_t = sched.alphas[t.cpu()].to(z).reshape(1, 1, 1, 1)
        a_t = bb.alphas_cumprod[t].reshape(1, 1, 1, 1)
        a_prev = bb.alphas_cumprod[t_prev].reshape(1, 1, 1, 1)
        sigma = ((1 - a_prev) / (1 - a_t) * beta_t).sqrt()
        c0 = a_prev.sqrt() * beta_t / (1 - a_t)
        c1 = alpha_t.sqrt() * (1 - a_prev) / (1 - a_t)

        def zeta(x0: torch.Tensor, x_t: torch.Tensor, eps_hat: torch.Tensor) -> torch.Tensor:
            x_prev = bb.add_noise(x0, eps_prev, t_prev)
            x0_hat = (x_t - (1 - a_t).sqrt() * eps_hat) / a_t.sqrt()
            return (x_prev - (c0 * x0_hat + c1 * x_t)) / sigma

        raw = zeta(z, x_t, tgt.value(scores)) - zeta(ctx.z_src, x_t_src, src.value(scores))
        return StepOut(raw, capture=scores.captures.get(tgt.cond))


class GroundAScore(Method):
    """Ground-A-Score (Chang et al.): per term k (the K subtasks, then the full prompt)

        g_k = gamma_k * M_k * w(t_k) (eps_hat_w(z_tk, y_tgt_k) - eps_hat_w(z_tk_src, y_src_k)),

    ``gamma_k = clamp(mean(|c (eps(z_tk, null) - eps(z_tk, y_tgt_k))| * M_k), 0, 1)`` for subtasks whose
    area is below `penalty_area` (the null-text penalty; 1 otherwise); the full-prompt term uses the
    union of the subtask masks and the weight ``beta_t`` instead of ``gamma``. Preserved subtasks add
    ``w_cut * M_k * d PatchNCE_box / d z`` (features of the conditional source branch vs. a pass on
    ``eps(z_tk, y_tgt_k)`` with autograd, both cropped to the subtask's box).

    Aggregated (default, the paper's sum): every term has its own ``(t_k, eps_k)``, all go through one
    scorer call, one optimizer step per iteration. Sequential (``aggregate=False``, the reference code):
    one optimizer step per term.
    """

    name = "ground_a_score"
    supports_attention_mask = False

    def _terms(self, ctx: EditContext) -> list[tuple[str, str, torch.Tensor, Region | None, bool]]:
        """(source, target, mask, region or None for the full prompt, penalty on), built once per context."""
        cached = getattr(self, "_cached", None)
        if cached is not None and cached[0] is ctx:
            return cached[1]
        cfg = self.cfg
        h, w = ctx.z_src.shape[-2:]
        regions = [s.region for s in ctx.subtasks]
        masks = resolve_overlaps([r.mask for r in regions], cfg.overlap_value)
        terms = []
        for sub, mask in zip(ctx.subtasks, masks):
            on = cfg.penalty == "always" or (cfg.penalty == "auto" and sub.region.area < cfg.penalty_area)
            terms.append((sub.source, sub.target, mask, sub.region, on))
        if cfg.full_prompt:
            full = union([r.mask for r in regions]) if regions else torch.ones(1, 1, h, w)
            terms.append((ctx.source_prompt, ctx.target_prompt, full, None, cfg.penalty == "always"))
        if not terms:
            raise ValueError("ground_a_score: no subtasks and full_prompt=false leave nothing to edit")
        self._cached = (ctx, terms)
        return terms

    def units(self, ctx):
        n = len(self._terms(ctx))
        return [None] if self.cfg.aggregate else list(range(n))

    def terms(self, ctx, unit):
        return len(self._terms(ctx)) if unit is None else 1

    def beta(self, t: int, T: int) -> float:
        b = self.cfg.beta
        return float(b[min(t * len(b) // T, len(b) - 1)])

    def step(self, z, draw, ctx, unit=None, record=False):
        bb, cfg = ctx.backbone, self.cfg
        all_terms = self._terms(ctx)
        chosen = list(range(len(all_terms))) if unit is None else [unit]
        t_all, eps_all = _on(draw, ctx)
        z = z.detach()
        null = ctx.embed("")
        requests: list[ScoreRequest] = []
        plan = []
        for j, index in enumerate(chosen):
            source, target, mask, region, penalty = all_terms[index]
            t, eps = t_all[j : j + 1], eps_all[j : j + 1]
            z_t, z_t_src = bb.add_noise(z, eps, t), bb.add_noise(ctx.z_src, eps, t)
            preserve = region is not None and ctx.subtasks[index].preserve
            src = _Guided(requests, z_t_src, t, ctx.embed(source), null, cfg.guidance, record=preserve)
            tgt = _Guided(requests, z_t, t, ctx.embed(target), null, cfg.guidance)
            plan.append((index, t, eps, mask.to(z), region, penalty, preserve, src, tgt))
        scores = ctx.scorer(requests)

        raw = torch.zeros_like(z)
        info: dict[str, Any] = {"gamma": [], "beta": None}
        for index, t, eps, mask, region, penalty, preserve, src, tgt in plan:
            g = mask * weight(cfg, bb, t) * (tgt.value(scores) - src.value(scores))
            if region is None:  # the full-prompt term
                g = self.beta(int(t), bb.num_train_timesteps) * g
                info["beta"] = self.beta(int(t), bb.num_train_timesteps)
            if penalty:
                if tgt.null is None:
                    raise ValueError("ground_a_score: the null-text penalty needs guidance != 1 (a null branch)")
                diff = scores.eps[tgt.null] - scores.eps[tgt.cond]
                gamma = (cfg.penalty_coeff * diff).abs().mul(mask).mean().clamp(0, 1)
                g = gamma * g
                info["gamma"].append(float(gamma))
            raw = raw + g

        extra = None
        preserved = [p for p in plan if p[6]]
        if preserved:
            with torch.enable_grad():
                leaves, second_requests = [], []
                for index, t, eps, *_ in preserved:
                    leaf = z.clone().requires_grad_(True)
                    leaves.append(leaf)
                    second_requests.append(ScoreRequest(bb.add_noise(leaf, eps, t), t, ctx.embed(all_terms[index][1]), record=True))
                second = ctx.scorer(second_requests)
                losses = []
                for i, (index, t, eps, mask, region, _, _, src, _) in enumerate(preserved):
                    j = chosen.index(index)
                    losses.append(cut_loss(scores.captures[src.cond].features, second.captures[i].features, ctx.cut_layers,
                                           cfg, int(draw.seeds[j]), region.box, z.shape[-1]))
                grads = torch.autograd.grad(torch.stack(losses).sum(), leaves)
            extra = sum(cfg.w_cut * p[3] * g for p, g in zip(preserved, grads))
            info["cut_loss"] = [float(x.detach()) for x in losses]
        return StepOut(raw, extra=extra, info=info)


METHOD_CLASSES: dict[str, type[Method]] = {
    "sds": SDS,
    "dds": DDS,
    "dds_s": DDS,
    "dds_sm": DDS,
    "cds": CDS,
    "sbp": SBP,
    "lusd": SBP,
    "pds": PDS,
    "ground_a_score": GroundAScore,
}


def make_method(cfg: EditorConfig, backbone=None) -> Method:
    if cfg.method not in METHOD_CLASSES:
        raise ValueError(f"unknown editor method {cfg.method!r}: expected one of {list(METHOD_CLASSES)}")
    return METHOD_CLASSES[cfg.method](cfg, backbone)
