"""Attention capture: record only what a method asks for, at layers chosen by relative resolution.

Layers are named by where they sit (`down`/`mid`/`up`), their kind (`self` = attn1, `cross` = attn2)
and their *divisor*: the layer works at ``latent_size / divisor``. The same selection (say
"cross-attention, up blocks, divisors 2 and 4") thus picks SD's 32x32 and 16x16 decoder layers at
512 px and the tiny model's 8x8 and 4x4 ones.

What `AttentionRecorder` records, per selected layer and per UNet call:
- ``cross_maps[name]``: cross-attention probabilities ``softmax(Q K^T / sqrt(d))`` of chosen token
  columns, averaged over heads: ``[B, HW, T]``;
- ``features[name]``: the attention block's output (after ``to_out``), ``[B, HW, C]``;
- ``products[name]``: ``mean_h softmax(Q_h K_h^T / sqrt(d)) @ a`` for a per-pixel vector ``a``,
  computed by scaled-dot-product attention with ``a`` as the value, so the ``HW x HW`` map is never
  materialized (``[B, HW, 1]``); with ``keep_maps=True`` the maps are also stored in ``maps[name]``;
- ``qk[name]``: the detached per-head queries and keys ``(q, k, scale)``, ``[B, heads, HW, d]`` each, so
  ``mean_h softmax(Q K^T * scale) @ a`` can be formed *after* the call (`attention_apply`) for a vector
  ``a`` that only exists once the whole UNet has run (LUSD's ``A_S @ A_C``); O(HW d) memory, never
  O(HW^2) (with ``keep_maps=True`` the maps are stored too, for debugging).
Every other layer keeps its own processor. Recorded tensors keep their autograd graph.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AttentionLayer:
    """One attention module of a UNet: its module path, kind, place and resolution divisor."""

    name: str
    kind: str  # "self" (attn1) or "cross" (attn2)
    place: str  # "down", "mid" or "up"
    divisor: int  # the layer's feature map is latent_size / divisor on each side


def list_attention_layers(unet: torch.nn.Module) -> list[AttentionLayer]:
    """Every attn1/attn2 module of a diffusers UNet2DConditionModel, with its resolution divisor."""
    layers: list[AttentionLayer] = []

    def collect(block: torch.nn.Module, prefix: str, place: str, divisor: int) -> None:
        for name, module in block.named_modules():
            last = name.rsplit(".", 1)[-1]
            if last in ("attn1", "attn2") and hasattr(module, "processor"):
                kind = "self" if last == "attn1" else "cross"
                layers.append(AttentionLayer(f"{prefix}.{name}", kind, place, divisor))

    divisor = 1
    for i, block in enumerate(unet.down_blocks):
        collect(block, f"down_blocks.{i}", "down", divisor)
        if getattr(block, "downsamplers", None):
            divisor *= 2
    if unet.mid_block is not None:
        collect(unet.mid_block, "mid_block", "mid", divisor)
    for i, block in enumerate(unet.up_blocks):
        collect(block, f"up_blocks.{i}", "up", divisor)
        if getattr(block, "upsamplers", None):
            divisor //= 2
    return layers


def select_layers(
    layers: Iterable[AttentionLayer],
    kind: str,
    places: Sequence[str] = ("up",),
    divisors: Sequence[int] | None = None,
) -> list[AttentionLayer]:
    """The layers of `kind` in `places` whose divisor is in `divisors` (all divisors when None).

    Raises ValueError when nothing matches, since a method silently recording nothing is a bug.
    """
    if kind not in ("self", "cross"):
        raise ValueError(f"attention kind must be 'self' or 'cross', got {kind!r}")
    layers = list(layers)
    chosen = [l for l in layers if l.kind == kind and l.place in places and (divisors is None or l.divisor in divisors)]
    if not chosen:
        available = sorted({(l.place, l.divisor) for l in layers if l.kind == kind})
        raise ValueError(f"no {kind}-attention layer in places {list(places)} with divisors {divisors}; available (place, divisor): {available}")
    return chosen


class _RecordingProcessor:
    """Attention processor that computes plain attention and reports to its recorder."""

    def __init__(self, recorder: "AttentionRecorder", layer: AttentionLayer, record: set[str]):
        self.recorder = recorder
        self.layer = layer
        self.record = record

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        q = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        k = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        v = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, k.shape[2], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])

        name = self.layer.name
        if "cross_maps" in self.record:
            # Cross-attention has few keys (77): materialize the probabilities once and reuse them.
            scores = (q @ k.transpose(-1, -2)) * attn.scale
            if attention_mask is not None:
                scores = scores + attention_mask
            probs = scores.softmax(dim=-1)
            out = probs @ v
            tokens = self.recorder.token_indices
            picked = probs if tokens is None else probs[..., tokens]
            self.recorder.cross_maps[name] = picked.mean(dim=1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=attn.scale)
        if "products" in self.record:
            self.recorder.products[name] = self._product(q, k, attn.scale, attention_mask)
        if "qk" in self.record:
            self.recorder.qk[name] = (q.detach(), k.detach(), float(attn.scale))
        if "maps" in self.record and self.recorder.keep_maps:
            probs = ((q @ k.transpose(-1, -2)) * attn.scale).softmax(dim=-1)
            self.recorder.maps[name] = probs.mean(dim=1)

        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if "features" in self.record:
            self.recorder.features[name] = out
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _product(self, q: torch.Tensor, k: torch.Tensor, scale: float, mask: torch.Tensor | None) -> torch.Tensor:
        """mean_h softmax(q_h k_h^T * scale) @ a, with `a` resized to this layer's resolution."""
        a = self.recorder.value
        if a is None:
            raise RuntimeError(f"layer {self.layer.name}: set recorder.value before a call that records products")
        side = int(math.isqrt(q.shape[2]))
        a = F.interpolate(a.to(q.dtype), size=(side, side), mode="bilinear", align_corners=False) if a.shape[-1] != side else a.to(q.dtype)
        return attention_apply(q, k, a.flatten(2).transpose(1, 2), scale, mask)


def attention_apply(q: torch.Tensor, k: torch.Tensor, value: torch.Tensor, scale: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``mean_h softmax(q_h k_h^T * scale) @ value`` by scaled-dot-product attention (no HW x HW map).

    `q`, `k`: ``[B, heads, HW, d]`` (as stored in ``AttentionRecorder.qk``); `value`: ``[B, HW, c]``,
    the same for every head. Returns ``[B, HW, c]``.
    """
    channels = value.shape[-1]
    v = value.to(q.dtype).unsqueeze(1).expand(-1, q.shape[1], -1, -1)
    if channels < q.shape[-1]:
        # The fused (flash / memory-efficient) kernels need v's head size to equal q's; a 1-wide value
        # falls back to the math path, which builds the HW x HW map. Zero columns change nothing.
        v = F.pad(v, (0, q.shape[-1] - channels))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)[..., :channels].mean(dim=1)


class AttentionRecorder:
    """Context manager that installs recording processors on chosen layers of a UNet.

    Usage::

        layers = list_attention_layers(unet)
        with AttentionRecorder(unet, cross=select_layers(layers, "cross", ("up",), (2, 4))) as rec:
            rec.token_indices = [5]
            unet(...)
            maps = rec.cross_maps  # {layer name: [B, HW, 1]}
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        cross: Sequence[AttentionLayer] = (),
        features: Sequence[AttentionLayer] = (),
        products: Sequence[AttentionLayer] = (),
        keep_maps: bool = False,
        queries_keys: Sequence[AttentionLayer] = (),
    ):
        self.unet = unet
        self.keep_maps = keep_maps
        self.token_indices: Sequence[int] | torch.Tensor | None = None
        self.value: torch.Tensor | None = None  # [B, 1, h, w] for products
        self.cross_maps: dict[str, torch.Tensor] = {}
        self.features: dict[str, torch.Tensor] = {}
        self.products: dict[str, torch.Tensor] = {}
        self.maps: dict[str, torch.Tensor] = {}
        self.qk: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        self._plan: dict[str, tuple[AttentionLayer, set[str]]] = {}
        for what, layers in (("cross_maps", cross), ("features", features), ("products", products), ("qk", queries_keys)):
            for layer in layers:
                entry = self._plan.setdefault(layer.name, (layer, set()))
                entry[1].add(what)
                if what in ("products", "qk"):
                    entry[1].add("maps")
        self._saved: dict[str, Any] = {}

    def clear(self) -> None:
        for store in (self.cross_maps, self.features, self.products, self.maps, self.qk):
            store.clear()

    def __enter__(self) -> "AttentionRecorder":
        modules = dict(self.unet.named_modules())
        for name, (layer, record) in self._plan.items():
            module = modules[name]
            self._saved[name] = module.processor
            module.set_processor(_RecordingProcessor(self, layer, record))
        return self

    def __exit__(self, *exc: Any) -> None:
        modules = dict(self.unet.named_modules())
        for name, processor in self._saved.items():
            modules[name].set_processor(processor)
        self._saved.clear()
