"""GLIGEN on the project's Backbone: the tiny gated model, layout checks, grounding inputs, the fuser switch.

GLIGEN (Li et al. 2023) adds to every transformer block of a Stable Diffusion UNet a gated
self-attention layer, diffusers' ``GatedSelfAttentionDense`` (``block.fuser``), between the
self-attention and the cross-attention. With ``h`` the self-attention output and ``g_i`` the
grounding tokens of the phrase/box pairs:

    fuser(h) = h1 + tanh(alpha_dense) * FF(LN(h1)),   h1 = h + tanh(alpha_attn) * SA(LN([h, g]))[:N]

so the fuser's output already includes the residual ``h``. The grounding tokens come from the UNet's
``position_net``: ``g_i = MLP([pooled CLIP text of phrase_i, Fourier(box_i)])``; a GLIGEN UNet is
called with ``cross_attention_kwargs={"gligen": {"boxes", "positive_embeddings", "masks"}}``.

A GLIGEN checkpoint is a diffusers folder with the usual unet/vae/text_encoder/tokenizer/scheduler
(the UNet's config has ``attention_type="gated"``), so `diffusion.backbone.load_backbone` loads it.
The tiny GLIGEN model (``tiny-gligen`` / ``tiny-gligen:<seed>``) is the tiny SD model of the same seed
with the gated layers added, as the real GLIGEN extends SD 1.4: with the fuser off it computes exactly
what the tiny SD model computes.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

TINY_GLIGEN_VERSION = 1  # bump when the builder below changes, so stale caches are rebuilt
# diffusers' GLIGEN pipeline pads the grounding tokens to 30 (what the released checkpoints were trained with).
MAX_OBJECTS = 30
# A trained GLIGEN's gates are non-zero; GLIGEN initialises them at 0, where the fuser is the identity,
# which would make the tiny model ignore its boxes. tanh(1.0) = 0.76.
TINY_GATE_ALPHA = 1.0


class LayoutError(ValueError):
    """Phrases/boxes that cannot ground a generation; the message names the entry and what is wrong."""


class NotGligenError(ValueError):
    """A model without GLIGEN's gated layers used where grounding is required."""


# ----------------------------------------------------------------------------- model checks
def is_gligen(unet: Any) -> bool:
    """True for a text-grounded GLIGEN UNet (``attention_type="gated"`` with its position_net)."""
    return getattr(unet.config, "attention_type", "default") == "gated" and hasattr(unet, "position_net")


def require_gligen(unet: Any, source: str = "the model") -> None:
    """Raise NotGligenError naming `source` unless its UNet is a text-grounded GLIGEN UNet."""
    kind = getattr(unet.config, "attention_type", "default")
    if kind == "gated-text-image":
        raise NotGligenError(
            f"model {source!r} is a GLIGEN text-image model (attention_type='gated-text-image'): only the text-box "
            "GLIGEN (attention_type='gated') is supported"
        )
    if not is_gligen(unet):
        raise NotGligenError(
            f"model {source!r} is not a GLIGEN model: its UNet has attention_type={kind!r} and no gated self-attention "
            "(fuser) layers, so boxes cannot ground it and ReGround's wiring does not apply. Use a GLIGEN checkpoint, "
            "e.g. model.pretrained=tiny-gligen or a local copy of masterful/gligen-1-4-generation-text-box"
        )


def gated_blocks(unet: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, BasicTransformerBlock) of every transformer block that holds a GLIGEN fuser, in module order."""
    from diffusers.models.attention import BasicTransformerBlock, GatedSelfAttentionDense

    return [
        (name, module)
        for name, module in unet.named_modules()
        if isinstance(module, BasicTransformerBlock) and isinstance(getattr(module, "fuser", None), GatedSelfAttentionDense)
    ]


def set_fuser(unet: torch.nn.Module, enabled: bool) -> None:
    """Turn every gated self-attention layer on or off (off: ``fuser(h) = h``), as GLIGEN's `enable_fuser`."""
    for _, block in gated_blocks(unet):
        block.fuser.enabled = enabled


def add_gated_layers(unet: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A copy of `unet` with GLIGEN's gated self-attention layers and position_net added (drawn from
    `seed`; gates at 0, so it computes what `unet` computes until trained), every other weight kept."""
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    torch.manual_seed(seed)
    gated = UNet2DConditionModel.from_config({**config, "attention_type": "gated"})
    result = gated.load_state_dict(unet.state_dict(), strict=False)
    new = [k for k in result.missing_keys if not (k.startswith("position_net.") or ".fuser." in k)]
    if new or result.unexpected_keys:
        raise RuntimeError(f"the gated UNet does not extend the given UNet: missing {new}, unexpected {result.unexpected_keys}")
    return gated


def set_gates(unet: torch.nn.Module, alpha: float) -> None:
    """Sets every gated self-attention's gate ``alpha_attn`` (its output is scaled by tanh(alpha_attn)).

    GLIGEN starts the gates at 0 so that a pretrained model is unchanged at the start. That also scales
    the gradient reaching the gated attention and `position_net` by tanh(alpha_attn): while the gate stays
    shut they barely learn, and nothing makes the gate open. A model trained from scratch has nothing to
    keep, so its gates can start open."""
    blocks = gated_blocks(unet)
    if not blocks:
        raise NotGligenError("the UNet has no gated self-attention layers (attention_type='gated')")
    with torch.no_grad():
        for _, block in blocks:
            block.fuser.alpha_attn.fill_(alpha)


@contextlib.contextmanager
def fuser_restored(unet: torch.nn.Module) -> Iterator[None]:
    """Restore each fuser's enabled flag on exit (scheduled sampling switches them off mid-run)."""
    states = [(block.fuser, block.fuser.enabled) for _, block in gated_blocks(unet)]
    try:
        yield
    finally:
        for fuser, enabled in states:
            fuser.enabled = enabled


# ----------------------------------------------------------------------------- layout
def validate_layout(phrases: Sequence[str], boxes: Sequence[Sequence[float]]) -> tuple[list[str], list[list[float]]]:
    """Check phrases and boxes ``[x0, y0, x1, y1]`` (fractions of width/height) and return them as lists.

    Raises LayoutError when the counts differ, there is no box or more than MAX_OBJECTS, a phrase is
    empty, a box has not 4 finite numbers, a coordinate is outside [0, 1], or x1 <= x0 or y1 <= y0.
    """
    if isinstance(phrases, str) or isinstance(boxes, str):
        raise LayoutError("phrases and boxes: give lists, e.g. phrases=['a cat'] boxes=[[0.1,0.2,0.6,0.9]]")
    if isinstance(boxes, torch.Tensor):
        boxes = boxes.tolist()
    phrases = [str(p) for p in phrases]
    boxes = [list(b) if isinstance(b, Sequence) and not isinstance(b, str) else b for b in boxes]
    if len(phrases) != len(boxes):
        raise LayoutError(f"phrases and boxes: {len(phrases)} phrase(s) but {len(boxes)} box(es); give one box per phrase")
    if not phrases:
        raise LayoutError("phrases and boxes: at least one phrase with its box is needed to ground a generation")
    if len(phrases) > MAX_OBJECTS:
        raise LayoutError(f"phrases and boxes: {len(phrases)} given, GLIGEN takes at most {MAX_OBJECTS}")
    out: list[list[float]] = []
    for i, (phrase, box) in enumerate(zip(phrases, boxes)):
        if not phrase.strip():
            raise LayoutError(f"phrases[{i}]: empty phrase")
        if not isinstance(box, list) or len(box) != 4:
            raise LayoutError(f"boxes[{i}] = {box!r}: a box is 4 numbers [x0, y0, x1, y1]")
        try:
            x0, y0, x1, y1 = (float(v) for v in box)
        except (TypeError, ValueError):
            raise LayoutError(f"boxes[{i}] = {box!r}: coordinates must be numbers") from None
        if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in (x0, y0, x1, y1)):
            raise LayoutError(f"boxes[{i}] = {box!r}: coordinates are fractions of the image size and must lie in [0, 1]")
        if x1 <= x0:
            raise LayoutError(f"boxes[{i}] = {box!r}: x1 ({x1}) must be greater than x0 ({x0})")
        if y1 <= y0:
            raise LayoutError(f"boxes[{i}] = {box!r}: y1 ({y1}) must be greater than y0 ({y0})")
        out.append([x0, y0, x1, y1])
    return phrases, out


def box_from_mask(mask: torch.Tensor) -> list[float]:
    """The tight box ``[x0, y0, x1, y1]`` (fractions of width/height) around the non-zero cells of `mask`.

    `mask` is ``[H, W]`` or ``[1, 1, H, W]`` (e.g. `distill.subject_mask.subject_mask`'s output on the
    latent grid); a cell ``(r, c)`` covers ``[c/W, (c+1)/W] x [r/H, (r+1)/H]``.
    """
    if mask.dim() == 4 and mask.shape[:2] == (1, 1):
        grid = mask[0, 0]
    elif mask.dim() == 2:
        grid = mask
    else:
        raise LayoutError(f"mask of shape {tuple(mask.shape)}: expected [H, W] or [1, 1, H, W]")
    grid = grid.detach() != 0
    rows = torch.nonzero(grid.any(dim=1)).flatten()
    cols = torch.nonzero(grid.any(dim=0)).flatten()
    if rows.numel() == 0:
        raise LayoutError("mask is empty: no subject cell to put a box around")
    h, w = grid.shape
    return [int(cols[0]) / w, int(rows[0]) / h, (int(cols[-1]) + 1) / w, (int(rows[-1]) + 1) / h]


def encode_phrases(backbone: Any, phrases: Sequence[str]) -> torch.Tensor:
    """Pooled CLIP text embeddings ``[n, D]`` of the phrases, as diffusers' GLIGEN pipeline computes them."""
    from dreamsteer.diffusion.backbone import warn_if_truncated

    warn_if_truncated(backbone.tokenizer, phrases, phrases)
    tokens = backbone.tokenizer(
        list(phrases),
        padding=True,
        truncation=True,
        max_length=backbone.tokenizer.model_max_length,
        return_tensors="pt",
    ).to(backbone.text_encoder.device)
    return backbone.text_encoder(**tokens).pooler_output


def grounding_inputs(
    backbone: Any,
    phrases: Sequence[str],
    boxes: Sequence[Sequence[float]],
    batch_size: int = 1,
    classifier_free: bool = False,
) -> dict[str, torch.Tensor]:
    """The ``cross_attention_kwargs["gligen"]`` dict for a batch: ``boxes [B,30,4]``,
    ``positive_embeddings [B,30,D]``, ``masks [B,30]`` (1 for a real object, 0 for padding).

    With `classifier_free`, the batch is doubled ``[uncond, cond]`` and the unconditional half gets
    masks 0 (the null grounding tokens), as diffusers' StableDiffusionGLIGENPipeline does.
    """
    phrases, boxes = validate_layout(phrases, boxes)
    device, dtype = backbone.text_encoder.device, backbone.text_encoder.dtype
    n = len(phrases)
    box_t = torch.zeros(MAX_OBJECTS, 4, device=device, dtype=dtype)
    box_t[:n] = torch.tensor(boxes, dtype=dtype)
    emb = torch.zeros(MAX_OBJECTS, backbone.unet.config.cross_attention_dim, device=device, dtype=dtype)
    emb[:n] = encode_phrases(backbone, phrases)
    masks = torch.zeros(MAX_OBJECTS, device=device, dtype=dtype)
    masks[:n] = 1
    box_t = box_t.unsqueeze(0).expand(batch_size, -1, -1).clone()
    emb = emb.unsqueeze(0).expand(batch_size, -1, -1).clone()
    masks = masks.unsqueeze(0).expand(batch_size, -1).clone()
    if classifier_free:
        box_t, emb, masks = torch.cat([box_t] * 2), torch.cat([emb] * 2), torch.cat([masks] * 2)
        masks[:batch_size] = 0
    return {"boxes": box_t, "positive_embeddings": emb, "masks": masks}


# ----------------------------------------------------------------------------- the tiny GLIGEN model
def build_tiny_gligen_pipeline(seed: int = 0, cache_dir: str | Path | None = None):
    """The tiny SD model of `seed` plus GLIGEN's gated layers (drawn from `seed`), as a StableDiffusionGLIGENPipeline.

    The tiny SD model is read from its saved folder (built there first if missing), so every weight
    it has is kept bit for bit; only ``position_net`` and the fusers are new, and their gates are set
    to TINY_GATE_ALPHA so the boxes matter.
    """
    from diffusers import StableDiffusionGLIGENPipeline, StableDiffusionPipeline

    from dreamsteer.diffusion.tiny import tiny_model_dir

    base = StableDiffusionPipeline.from_pretrained(tiny_model_dir(seed, cache_dir), safety_checker=None, local_files_only=True)
    unet = add_gated_layers(base.unet, seed + 3)
    with torch.no_grad():
        for _, block in gated_blocks(unet):
            block.fuser.alpha_attn.fill_(TINY_GATE_ALPHA)
            block.fuser.alpha_dense.fill_(TINY_GATE_ALPHA)
    return StableDiffusionGLIGENPipeline(
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        unet=unet,
        scheduler=base.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_gligen_dir(seed: int = 0, cache_dir: str | Path | None = None) -> Path:
    """The diffusers folder of the tiny GLIGEN model for `seed`, built once (temp dir renamed into place)."""
    from dreamsteer.diffusion.tiny import TINY_VERSION, build_once, default_cache_dir

    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    # Both versions in the name: a change of the tiny SD model (the base) also rebuilds this one.
    target = root / f"tiny-gligen-v{TINY_GLIGEN_VERSION}.{TINY_VERSION}-seed{seed}"
    return build_once(target, lambda: build_tiny_gligen_pipeline(seed, root))
