"""The edit loop shared by every score-distillation method.

``z = z_src``; for ``k = 0..N-1``: per unit of the method (one, or Ground-A-Score's K+1 in sequential
mode) draw ``(t, eps)`` from the job's generator, compute the method's gradient ``g`` (re-drawing the
noise while the gradient filter rejects it), apply the enabled plug-ins (attention mask, L2 pull,
std normalization), set ``z.grad = loss_scale / loss_divisor * g + extra`` and take an optimizer
step. Then decode. Everything random comes from one CPU generator seeded by the job's seed, so the
same seed gives the same image on any device count.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from dreamsteer.distill.attention import AttentionRecorder, list_attention_layers, select_layers
from dreamsteer.distill.config import ATTENTION_PLACES, OPTIMIZERS, PENALTY_MODES, SCHEMAS, WEIGHTINGS, EditorConfig
from dreamsteer.distill.methods import METHOD_CLASSES, EditContext, Method, StepOut, Subtask, make_method
from dreamsteer.distill.prompts import edit_words, subject_words, token_indices
from dreamsteer.distill.regularizers import AttentionMask, GradientFilter, gamma_schedule, l2_pull, mask_weight, std_normalize
from dreamsteer.distill.scorer import Scorer


class EditorConfigError(ValueError):
    """An editor config value out of range; `key` names it."""

    def __init__(self, key: str, why: str):
        super().__init__(f"editor key '{key}': {why}")
        self.key, self.why = key, why


class EditDivergedError(FloatingPointError):
    """The optimization produced a non-finite gradient or latent (NaN / inf)."""


@dataclass
class EditResult:
    """The edited image ``[3, H, W]`` in [-1, 1], its latent, the method's mask (or None) and a trace."""

    image: torch.Tensor
    latent: torch.Tensor
    mask: torch.Tensor | None
    trace: dict[str, Any] = field(default_factory=dict)


def check_editor(cfg: EditorConfig, num_train_timesteps: int = 1000) -> None:
    """Range checks of an editor config; ValueError names the key."""
    def bad(key: str, why: str) -> EditorConfigError:
        return EditorConfigError(key, f"{why} (got {getattr(cfg, key)!r})")

    if cfg.method not in SCHEMAS:
        raise bad("method", f"unknown method, expected one of {list(SCHEMAS)}")
    if not isinstance(cfg, SCHEMAS[cfg.method]):
        raise EditorConfigError("method", f"a {type(cfg).__name__} does not fit method {cfg.method!r}")
    if cfg.steps < 1:
        raise bad("steps", "must be >= 1")
    if not 0 <= cfg.t_min <= cfg.t_max < num_train_timesteps:
        raise bad("t_min", f"need 0 <= t_min <= t_max < {num_train_timesteps} (t_max={cfg.t_max})")
    if cfg.max_batch < 1:
        raise bad("max_batch", "must be >= 1")
    if cfg.weighting not in WEIGHTINGS:
        raise bad("weighting", f"expected one of {list(WEIGHTINGS)}")
    if cfg.optimizer not in OPTIMIZERS:
        raise bad("optimizer", f"expected one of {list(OPTIMIZERS)}")
    if not (cfg.lr > 0 and cfg.loss_divisor > 0):
        raise bad("lr", "lr and loss_divisor must be > 0")
    for key in ("mask_places",) + (("cut_places",) if hasattr(cfg, "cut_places") else ()):
        if not getattr(cfg, key) or any(p not in ATTENTION_PLACES for p in getattr(cfg, key)):
            raise bad(key, f"expected a non-empty subset of {list(ATTENTION_PLACES)}")
    if not 0 <= cfg.mask_alpha <= 1:
        raise bad("mask_alpha", "must lie in [0, 1]")
    if cfg.filter and not (cfg.filter_eta0 >= 0 and 0 < cfg.filter_decay <= 1 and cfg.filter_max_tries >= 0):
        raise bad("filter_eta0", "need filter_eta0 >= 0, 0 < filter_decay <= 1, filter_max_tries >= 0")
    if not 0 <= cfg.reg_lambda <= 1:
        raise bad("reg_lambda", "must lie in [0, 1]")
    if cfg.attention_mask and not METHOD_CLASSES[cfg.method].supports_attention_mask:
        raise bad("attention_mask", f"method {cfg.method} does not support the attention-mask plug-in")
    if hasattr(cfg, "patch_sizes") and (not cfg.patch_sizes or min(cfg.patch_sizes) < 1 or cfg.n_patches < 1):
        raise bad("patch_sizes", "patch sizes must be >= 1 and n_patches >= 1")
    if getattr(cfg, "penalty", "auto") not in PENALTY_MODES:
        raise bad("penalty", f"expected one of {list(PENALTY_MODES)}")
    if hasattr(cfg, "beta") and not cfg.beta:
        raise bad("beta", "needs at least one value")
    if hasattr(cfg, "pds_grid") and not (1 <= cfg.pds_grid <= num_train_timesteps and 0 <= cfg.pds_min_ratio < cfg.pds_max_ratio <= 1):
        raise bad("pds_grid", "need 1 <= pds_grid <= T and 0 <= pds_min_ratio < pds_max_ratio <= 1")


def editor_config(values: dict[str, Any]) -> EditorConfig:
    """An editor config dataclass from plain values (unknown keys raise ValueError naming them)."""
    method = values.get("method", "dds")
    if method not in SCHEMAS:
        raise ValueError(f"editor key 'method': unknown method {method!r}, expected one of {list(SCHEMAS)}")
    schema = SCHEMAS[method]
    known = {f.name for f in dataclasses.fields(schema)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"editor key '{unknown[0]}': not a key of method {method} (keys: {sorted(known)})")
    return schema(**values)


def attention_layers(cfg: EditorConfig, unet, mask: bool, features: bool) -> dict[str, list]:
    """The recorder layers needed: the attention-mask plug-in's (`mask`) and PatchNCE's (`features`)."""
    layers = list_attention_layers(unet)
    need: dict[str, list] = {"cross": [], "qk": [], "features": []}
    if mask:
        need["cross"] = select_layers(layers, "cross", cfg.mask_places, cfg.mask_cross_divisors)
        need["qk"] = select_layers(layers, "self", cfg.mask_places, cfg.mask_self_divisors)
    if features:
        need["features"] = select_layers(layers, "self", cfg.cut_places, cfg.cut_divisors)
    return need


class Editor:
    """Runs one edit: the constructor builds the context (embeddings, masks, recorder), `run` the loop."""

    def __init__(self, backbone, cfg: EditorConfig, source_prompt: str, target_prompt: str, z_src: torch.Tensor,
                 subtasks: Sequence[Subtask] = (), subject_mask: torch.Tensor | None = None):
        check_editor(cfg, backbone.num_train_timesteps)
        if cfg.method == "ground_a_score" and not subtasks and not cfg.full_prompt:
            raise ValueError("ground_a_score: give subtasks or keep full_prompt=true")
        self.backbone = backbone
        self.cfg = cfg
        self.method: Method = make_method(cfg, backbone)
        # LUSD's edit tokens; none found -> a uniform mask, as the reference does
        self.tokens: list[str] = []
        columns = None
        if cfg.attention_mask:
            self.tokens = list(cfg.edit_tokens) if cfg.edit_tokens else edit_words(source_prompt, target_prompt)
            expand = backbone.expand_prompt  # multi-vector words: as `Backbone.tokenize` sees them
            # found from the prompts' difference: only their occurrences in the differing part; user-named: every one
            differing_from = None if cfg.edit_tokens else expand(source_prompt)
            columns = token_indices(backbone.tokenizer, expand(target_prompt), self.tokens, differing_from) if self.tokens else None
        features = cfg.method == "cds" or (cfg.method == "ground_a_score" and any(s.preserve for s in subtasks))
        self.layers = attention_layers(cfg, backbone.unet, mask=columns is not None, features=features)
        self.recorder: AttentionRecorder | None = None
        if any(self.layers.values()):
            self.recorder = AttentionRecorder(backbone.unet, cross=self.layers["cross"], features=self.layers["features"],
                                              keep_maps=cfg.keep_maps, queries_keys=self.layers["qk"])
            self.recorder.token_indices = columns
        self.mask_plugin = AttentionMask(self.layers["cross"], self.layers["qk"], cfg.mask_alpha, cfg.keep_maps) if columns else None
        self.scorer = Scorer(backbone, cfg.max_batch, self.recorder)
        subject = None
        if getattr(cfg, "subject_mask", None) is not None:  # DDS-SM (a given tensor wins over "auto")
            subject = subject_mask if subject_mask is not None else self._auto_subject_mask(z_src, source_prompt, target_prompt)
            if tuple(subject.shape) != (1, 1, *z_src.shape[-2:]):
                raise ValueError(f"subject mask of shape {list(subject.shape)}: expected [1, 1, {z_src.shape[-2]}, {z_src.shape[-1]}]")
        self.ctx = EditContext(backbone, self.scorer, z_src, source_prompt, target_prompt, subtasks, subject,
                               self.layers["features"])

    def _auto_subject_mask(self, z_src, source_prompt: str, target_prompt: str) -> torch.Tensor:
        cfg = self.cfg
        if cfg.subject_mask != "auto":
            raise ValueError(f"editor key 'subject_mask': {cfg.subject_mask!r} is a mask path; load it and pass the tensor")
        token = cfg.subject_token or subject_words(source_prompt, target_prompt)
        if not token:
            raise ValueError("editor key 'subject_token': could not infer the subject word of the source prompt; "
                             "set editor.subject_token (e.g. 'cat')")
        from dreamsteer.distill.subject_mask import subject_mask

        return subject_mask(self.backbone, z_src, source_prompt, token, timesteps=tuple(cfg.mask_timesteps),
                            divisors=tuple(cfg.mask_divisors), threshold=cfg.mask_threshold,
                            dilation=cfg.mask_dilation).mask

    def gradient(self, z: torch.Tensor, k: int, out: StepOut) -> tuple[torch.Tensor, dict[str, Any]]:
        """``z.grad`` for step `k` from an accepted `StepOut`: plug-ins, then scale, then the extra term."""
        cfg = self.cfg
        g = out.raw
        info: dict[str, Any] = {}
        if self.mask_plugin is not None:
            g = self.mask_plugin.modulate(g, k, cfg.steps)
            info["mask_weight"] = mask_weight(k, cfg.steps) if self.mask_plugin.mask is not None else 0.0
        if cfg.reg_lambda:
            g = l2_pull(g, z, self.ctx.z_src, cfg.reg_lambda)
        if cfg.normalize:
            gamma = gamma_schedule(k, cfg.steps, cfg.gamma_low, cfg.gamma_high, cfg.gamma_speed)
            g = std_normalize(g, gamma)
            info["gamma"] = gamma
        grad = (cfg.loss_scale / cfg.loss_divisor) * g
        if out.extra is not None:
            grad = grad + out.extra
        return grad, info

    def evaluate(self, z: torch.Tensor, gen: torch.Generator, unit: Any) -> tuple[StepOut, dict[str, Any]]:
        """One accepted evaluation: draw, compute, and re-draw while the gradient filter rejects."""
        cfg = self.cfg
        draw = self.method.sample(gen, self.ctx, unit)
        record = self.mask_plugin is not None
        filt = GradientFilter(cfg.filter_eta0, cfg.filter_decay, cfg.filter_max_tries) if cfg.filter else None
        tries = 0
        while True:
            with torch.no_grad():
                out = self.method.step(z, draw, self.ctx, unit, record=record)
            if filt is None or tries >= cfg.filter_max_tries or filt.accept(out.raw):
                break
            tries += 1
            draw = self.method.resample(draw, gen, self.ctx, unit, cfg.filter_resample_t)
        return out, {"t": [int(x) for x in draw.t], "rejected": tries, "raw_std": float(out.raw.std())}

    def optimizer(self, z: torch.Tensor) -> torch.optim.Optimizer:
        cfg = self.cfg
        return torch.optim.SGD([z], lr=cfg.lr) if cfg.optimizer == "sgd" else torch.optim.Adam([z], lr=cfg.lr)

    def iteration(self, z: torch.Tensor, k: int, gen: torch.Generator, opt: torch.optim.Optimizer) -> list[dict[str, Any]]:
        """Iteration `k`: one optimizer step per unit of the method (call inside the recorder's context)."""
        cfg = self.cfg
        entries = []
        for unit in self.method.units(self.ctx):
            out, entry = self.evaluate(z, gen, unit)
            grad, info = self.gradient(z, k, out)
            if not torch.isfinite(grad).all():
                raise EditDivergedError(f"step {k}: the gradient is not finite (NaN/inf); lower editor.lr or check the inputs")
            opt.zero_grad(set_to_none=True)
            z.grad = grad.to(z.dtype)
            opt.step()
            if self.mask_plugin is not None and out.capture is not None and k < cfg.steps - 1:
                self.mask_plugin.update(out.capture, tuple(z.shape[-2:]))
            entry.update(info)
            entry.update(out.info)
            entry["k"] = k
            entries.append(entry)
        return entries

    def recording(self) -> contextlib.AbstractContextManager:
        """The attention recorder's context (a no-op when the method records nothing)."""
        return self.recorder if self.recorder is not None else contextlib.nullcontext()

    def run(self, seed: int, progress: bool = True, desc: str = "edit") -> EditResult:
        cfg, bb = self.cfg, self.backbone
        gen = torch.Generator().manual_seed(int(seed))
        z = self.ctx.z_src.detach().clone().requires_grad_(True)
        opt = self.optimizer(z)
        steps: list[dict[str, Any]] = []
        start = time.perf_counter()
        with self.recording():
            for k in tqdm(range(cfg.steps), desc=desc, disable=not progress, leave=False):
                steps.extend(self.iteration(z, k, gen, opt))
                if not torch.isfinite(z).all():
                    raise EditDivergedError(f"step {k}: the latent is not finite (NaN/inf)")
        loop_s = time.perf_counter() - start
        with torch.no_grad():
            image = bb.decode(z.detach())[0].float().clamp(-1, 1)
        trace = {
            "steps": steps,
            "unet_calls": self.scorer.calls,
            "unet_rows": self.scorer.rows,
            "loop_s": loop_s,
            "edit_tokens": self.tokens,
        }
        return EditResult(image.cpu(), z.detach(), self.output_mask(), trace)

    def output_mask(self) -> torch.Tensor | None:
        """The method's mask for the outputs: LUSD's EMA mask, DDS-SM's subject mask, Ground-A-Score's union."""
        if self.mask_plugin is not None and self.mask_plugin.mask is not None:
            return self.mask_plugin.mask.detach().cpu()
        if self.ctx.subject_mask is not None:
            return self.ctx.subject_mask.detach().float().cpu()
        if self.cfg.method == "ground_a_score" and self.ctx.subtasks:
            from dreamsteer.distill.masks import union

            return union([s.region.mask for s in self.ctx.subtasks])
        return None


def encode_source(backbone, image: torch.Tensor) -> torch.Tensor:
    """The posterior-mean latent ``[1, C, h, w]`` (float32) of an image ``[3, H, W]`` in [-1, 1]."""
    with torch.no_grad():
        return backbone.encode_image(image[None].to(backbone.device)).float()


def edit(backbone, image: torch.Tensor, source_prompt: str, target_prompt: str, cfg: EditorConfig, seed: int = 0,
         subtasks: Sequence[Subtask] = (), subject_mask: torch.Tensor | None = None, progress: bool = True,
         desc: str = "edit") -> EditResult:
    """Edit `image` (``[3, H, W]`` in [-1, 1] at the model resolution) from `source_prompt` to `target_prompt`."""
    if not source_prompt and cfg.method not in ("sds",):
        raise ValueError(f"method {cfg.method} needs a source prompt")
    if not target_prompt:
        raise ValueError("the target prompt is empty")
    t0 = time.perf_counter()
    z_src = encode_source(backbone, image)
    editor = Editor(backbone, cfg, source_prompt, target_prompt, z_src, subtasks, subject_mask)
    result = editor.run(seed, progress=progress, desc=desc)
    result.trace["total_s"] = time.perf_counter() - t0
    return result
