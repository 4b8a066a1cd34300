"""ReGround (Lee et al., ECCV 2024): GLIGEN's gated self-attention and cross-attention in parallel.

GLIGEN's transformer block is sequential (diffusers' ``BasicTransformerBlock.forward``), with
``h = attn1(norm1 h) + h`` the self-attention output:

    sequential:  h' = attn2(norm2 fuser(h)) + fuser(h)
    parallel:    h' = h + [fuser(h) - h] + attn2(norm2 h)  =  fuser(h) + attn2(norm2 h)

then ``out = ff(norm3 h') + h'`` in both. diffusers' fuser already returns ``h + GSA terms``, so the
parallel block adds ``h`` exactly once (the unofficial implementation's ``fuser(h) + attn2(...) + h``
counts it twice). With the fuser off (``fuser(h) = h``) both wirings are the plain SD block. Only the
block's forward changes: no new parameters, no extra compute.

`apply_wiring` installs the parallel forward on each gated block as an instance attribute; removing it
(`remove_wiring`, or `apply_wiring(unet, "sequential")`) deletes that attribute, so the class's own
forward, diffusers' code, runs again. `grounded_sample` is the GLIGEN sampling loop (classifier-free
guidance with null grounding tokens on the unconditional half, scheduled sampling: grounding on for the
first ``int(beta * steps)`` steps) over either wiring.
"""
from __future__ import annotations

import contextlib
import inspect
import types
from typing import Any, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from dreamsteer.diffusion.gligen import fuser_restored, gated_blocks, grounding_inputs, require_gligen, set_fuser, validate_layout
from dreamsteer.diffusion.schedulers import SCHEDULERS, make_scheduler

WIRINGS = ("sequential", "parallel")


def parallel_block_forward(
    self: Any,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    encoder_hidden_states: torch.Tensor | None = None,
    encoder_attention_mask: torch.Tensor | None = None,
    timestep: torch.LongTensor | None = None,
    cross_attention_kwargs: dict[str, Any] | None = None,
    class_labels: torch.LongTensor | None = None,
    added_cond_kwargs: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """ReGround's forward for a layer-norm ``BasicTransformerBlock`` with a fuser (bound by `apply_wiring`).

    It follows diffusers' forward line by line except that the cross-attention reads the self-attention
    output ``h`` instead of ``fuser(h)``: ``h' = fuser(h) + attn2(norm2 h)``, ``out = ff(norm3 h') + h'``.
    The keyword signature is diffusers' (timestep, class_labels, added_cond_kwargs only feed ada-norm
    blocks, which `apply_wiring` refuses).
    """
    from diffusers.models.attention import _chunked_feed_forward

    norm_hidden_states = self.norm1(hidden_states)
    if self.pos_embed is not None:
        norm_hidden_states = self.pos_embed(norm_hidden_states)

    cross_attention_kwargs = dict(cross_attention_kwargs) if cross_attention_kwargs is not None else {}
    gligen_kwargs = cross_attention_kwargs.pop("gligen", None)

    attn_output = self.attn1(
        norm_hidden_states,
        encoder_hidden_states=encoder_hidden_states if self.only_cross_attention else None,
        attention_mask=attention_mask,
        **cross_attention_kwargs,
    )
    hidden_states = attn_output + hidden_states
    if hidden_states.ndim == 4:
        hidden_states = hidden_states.squeeze(1)

    # Spatial grounding: fuser(h) = h + gated terms (the residual is inside; off, it returns h itself).
    grounded = self.fuser(hidden_states, gligen_kwargs["objs"]) if gligen_kwargs is not None else hidden_states

    # Textual grounding on the same h, in parallel: the input the cross-attention had in the original SD.
    if self.attn2 is not None:
        norm_hidden_states = self.norm2(hidden_states)
        if self.pos_embed is not None:
            norm_hidden_states = self.pos_embed(norm_hidden_states)
        attn_output = self.attn2(
            norm_hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=encoder_attention_mask,
            **cross_attention_kwargs,
        )
        # Same operand order as diffusers (attn + residual) so that, fuser off, the sum is bit-identical.
        hidden_states = attn_output + grounded
    else:
        hidden_states = grounded

    norm_hidden_states = self.norm3(hidden_states)
    if self._chunk_size is not None:
        ff_output = _chunked_feed_forward(self.ff, norm_hidden_states, self._chunk_dim, self._chunk_size)
    else:
        ff_output = self.ff(norm_hidden_states)
    hidden_states = ff_output + hidden_states
    if hidden_states.ndim == 4:
        hidden_states = hidden_states.squeeze(1)
    return hidden_states


def _installed_forward(block: torch.nn.Module) -> Any:
    return block.__dict__.get("forward")


def _is_parallel(block: torch.nn.Module) -> bool:
    return getattr(_installed_forward(block), "__func__", None) is parallel_block_forward


def current_wiring(unet: torch.nn.Module) -> str:
    """'parallel' when the gated blocks run ReGround's forward, else 'sequential' (GLIGEN's own)."""
    blocks = gated_blocks(unet)
    return "parallel" if blocks and all(_is_parallel(b) for _, b in blocks) else "sequential"


def apply_wiring(unet: torch.nn.Module, wiring: str, source: str = "the model") -> None:
    """Switch every gated block of a GLIGEN `unet` to `wiring` ('sequential' | 'parallel').

    'parallel' binds `parallel_block_forward` to each gated block; 'sequential' removes it, so the
    block runs diffusers' own forward again. Raises NotGligenError for a UNet without gated blocks and
    ValueError for an unknown wiring or a block this forward cannot replace.
    """
    if wiring not in WIRINGS:
        raise ValueError(f"wiring {wiring!r}: expected one of {list(WIRINGS)}")
    require_gligen(unet, source)
    blocks = gated_blocks(unet)
    for name, block in blocks:  # check every block before changing any
        if block.norm_type != "layer_norm":
            raise ValueError(f"block {name}: norm_type {block.norm_type!r}; ReGround's forward supports GLIGEN's layer-norm blocks only")
        installed = _installed_forward(block)
        if installed is not None and not _is_parallel(block):
            raise ValueError(f"block {name}: its forward is already patched by other code ({installed!r}); refusing to rewire it")
    for _, block in blocks:
        if wiring == "parallel":
            block.forward = types.MethodType(parallel_block_forward, block)
        elif _is_parallel(block):
            del block.forward


def remove_wiring(unet: torch.nn.Module) -> None:
    """Restore GLIGEN's sequential forward on every block (a no-op where it was never rewired)."""
    for _, block in gated_blocks(unet):
        if _is_parallel(block):
            del block.forward


@contextlib.contextmanager
def wired(unet: torch.nn.Module, wiring: str, source: str = "the model") -> Iterator[None]:
    """Run the body with `wiring`, then put back the wiring the UNet had before."""
    before = current_wiring(unet)
    apply_wiring(unet, wiring, source)
    try:
        yield
    finally:
        apply_wiring(unet, before, source)


def grounding_steps(beta: float, num_steps: int) -> int:
    """GLIGEN's scheduled sampling: the number of first steps with grounding on, ``int(beta * num_steps)``."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta {beta}: the grounded fraction of the sampling steps must lie in [0, 1]")
    return int(beta * num_steps)


def _step_kwargs(scheduler: Any, generator: torch.Generator | None) -> dict[str, Any]:
    """eta = 0 for DDIM and the generator for stochastic schedulers, where `step` takes them (as diffusers does)."""
    params = inspect.signature(scheduler.step).parameters
    kwargs: dict[str, Any] = {}
    if "eta" in params:
        kwargs["eta"] = 0.0
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs


def grounded_sample(
    backbone: Any,
    prompt: str,
    phrases: Sequence[str],
    boxes: Sequence[Sequence[float]],
    wiring: str = "parallel",
    beta: float = 0.3,
    steps: int = 25,
    generator: torch.Generator | None = None,
    *,
    guidance_scale: float = 7.5,
    negative_prompt: str = "",
    scheduler: str = "ddim",
    num_images: int = 1,
    latents: torch.Tensor | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Layout-grounded sampling with a GLIGEN backbone (and whatever adapter it carries); returns the
    final latents ``[num_images, 4, h, w]`` (decode them with ``backbone.decode``).

    Each step: ``eps = eps_u + w (eps_c - eps_u)`` from one UNet call on ``[uncond, cond]``, the
    unconditional half grounded by GLIGEN's null tokens; the fusers are on for the first
    ``int(beta * steps)`` steps, then off (scheduled sampling); `wiring` picks GLIGEN's sequential
    block or ReGround's parallel one. With ``wiring="sequential"`` this is what diffusers'
    StableDiffusionGLIGENPipeline computes for the same scheduler and noise. `latents` is the initial
    noise (drawn from `generator` when None). The UNet's wiring and fuser flags are restored on exit.
    """
    if wiring not in WIRINGS:
        raise ValueError(f"wiring {wiring!r}: expected one of {list(WIRINGS)}")
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler {scheduler!r}: expected one of {list(SCHEDULERS)}")
    if steps < 1 or num_images < 1:
        raise ValueError(f"steps ({steps}) and num_images ({num_images}) must be >= 1")
    n_grounded = grounding_steps(beta, steps)
    require_gligen(backbone.unet, backbone.source)
    phrases, boxes = validate_layout(phrases, boxes)

    unet = backbone.unet
    device, dtype = backbone.device, backbone.dtype
    sched = make_scheduler(scheduler, backbone.scheduler.config)
    sched.set_timesteps(steps, device=device)
    do_cfg = guidance_scale > 1.0
    shape = (num_images, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    if latents is None:
        from diffusers.utils.torch_utils import randn_tensor

        latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    elif tuple(latents.shape) != shape:
        raise ValueError(f"latents of shape {tuple(latents.shape)}: expected {shape}")
    latents = latents.to(device, dtype) * sched.init_noise_sigma
    step_kwargs = _step_kwargs(sched, generator)

    with torch.no_grad(), wired(unet, wiring, backbone.source), fuser_restored(unet):
        text = backbone.encode_prompt([prompt] * num_images)
        if do_cfg:
            text = torch.cat([backbone.encode_prompt([negative_prompt] * num_images), text])
        gligen = grounding_inputs(backbone, phrases, boxes, num_images, classifier_free=do_cfg)
        set_fuser(unet, True)
        for i, t in enumerate(tqdm(sched.timesteps, desc=f"grounded sampling ({wiring})", disable=not progress)):
            if i == n_grounded:
                set_fuser(unet, False)
            model_input = torch.cat([latents] * 2) if do_cfg else latents
            model_input = sched.scale_model_input(model_input, t)
            noise = unet(model_input, t, encoder_hidden_states=text.to(dtype), cross_attention_kwargs={"gligen": gligen}).sample
            if do_cfg:
                uncond, cond = noise.chunk(2)
                noise = uncond + guidance_scale * (cond - uncond)
            latents = sched.step(noise, t, latents, **step_kwargs).prev_sample
    return latents
