"""Automatic subject mask from cross-attention (DreamSteerer Sec. 4.3 / App. J, as we reconstruct it).

The source latent is noised at a few timesteps with one fixed noise; one UNet call (batch = number of
timesteps) on the source prompt records the cross-attention probabilities of the subject token's
column(s) at the decoder layers working at latent/2 and latent/4 (SD at 512 px: 32x32 and 16x16,
the resolutions the paper names). The map is

    A = mean_{t, layer} upsample( mean_{head} softmax(Q K^T / sqrt(d))[:, token] )   (summed over the
                                                                                  token's sub-words)
    soft = (A - min A) / (max A - min A),   mask = dilate(soft >= threshold).

By default the pre-trained model computes it (adapters disabled): the source prompt names the class,
not the personal concept, and the mask must not depend on what is being steered.
"""
from __future__ import annotations

import contextlib
import math
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from dreamsteer.distill.attention import AttentionRecorder, list_attention_layers, select_layers

DEFAULT_TIMESTEPS = (100, 300, 500)


class SubjectMask(NamedTuple):
    """A binary mask ``[1, 1, h, w]`` in {0, 1} and the normalized soft map it was thresholded from."""

    mask: torch.Tensor
    soft: torch.Tensor


def token_positions(tokenizer, prompt: str, token: str) -> list[int]:
    """Column indices (in the padded prompt, BOS at 0) of every occurrence of `token`'s sub-word ids.

    Raises ValueError when `token` is empty or does not occur in `prompt` as whole sub-words.
    """
    if not token or not token.strip():
        raise ValueError(f"subject token {token!r} is empty")
    prompt_ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    token_ids = tokenizer(token.strip(), add_special_tokens=False).input_ids
    n = len(token_ids)
    positions: list[int] = []
    for start in range(len(prompt_ids) - n + 1):
        if prompt_ids[start : start + n] == token_ids:
            positions.extend(range(start, start + n))
    if not positions:
        raise ValueError(f"subject token {token!r} does not occur in the prompt {prompt!r}")
    return positions


def mask_from_maps(maps: Sequence[torch.Tensor], size: tuple[int, int], threshold: float, dilation: int) -> SubjectMask:
    """Average per-layer maps ``[B, 1, s, s]`` (upsampled to `size`, averaged over B too), normalize,
    threshold and dilate by `dilation` latent pixels (a (2*dilation+1)^2 max filter)."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"subject mask threshold {threshold}: expected a value in [0, 1]")
    if dilation < 0:
        raise ValueError(f"subject mask dilation {dilation}: expected >= 0")
    up = [F.interpolate(m.float(), size=size, mode="bilinear", align_corners=False) for m in maps]
    avg = torch.stack(up).mean(dim=0).mean(dim=0, keepdim=True)  # layers, then timesteps
    lo, hi = avg.amin(), avg.amax()
    soft = (avg - lo) / (hi - lo) if hi > lo else torch.ones_like(avg)
    mask = (soft >= threshold).float()
    if dilation > 0:
        mask = F.max_pool2d(mask, kernel_size=2 * dilation + 1, stride=1, padding=dilation)
    return SubjectMask(mask=mask, soft=soft)


@torch.no_grad()
def subject_mask(
    backbone,
    z_src: torch.Tensor,
    prompt: str,
    token: str,
    timesteps: Sequence[int] = DEFAULT_TIMESTEPS,
    divisors: Sequence[int] = (2, 4),
    threshold: float = 0.5,
    dilation: int = 0,
    seed: int = 0,
    pretrained: bool = True,
) -> SubjectMask:
    """The subject mask of `token` (a word of `prompt`) on the source latent `z_src` ``[1, 4, h, w]``.

    Returns ``SubjectMask(mask [1,1,h,w] in {0,1}, soft [1,1,h,w] in [0,1])`` (a tuple). `pretrained`
    computes it with the backbone's adapter disabled. Raises ValueError before any UNet call when the
    token is not in the prompt or the arguments are out of range.
    """
    if z_src.dim() != 4 or z_src.shape[0] != 1:
        raise ValueError(f"subject mask: z_src must be [1, C, h, w], got {list(z_src.shape)}")
    if not timesteps:
        raise ValueError("subject mask: timesteps is empty")
    bad = [t for t in timesteps if not 0 <= int(t) < backbone.num_train_timesteps]
    if bad:
        raise ValueError(f"subject mask timesteps {bad}: expected integers in [0, {backbone.num_train_timesteps})")
    if not 0.0 <= threshold <= 1.0 or dilation < 0:
        raise ValueError(f"subject mask threshold {threshold} / dilation {dilation}: expected threshold in [0, 1], dilation >= 0")
    columns = token_positions(backbone.tokenizer, prompt, token)
    layers = select_layers(list_attention_layers(backbone.unet), "cross", ("up",), tuple(divisors))

    gen = torch.Generator(device="cpu").manual_seed(seed)
    eps = torch.randn(z_src.shape, generator=gen).to(z_src.device, z_src.dtype)
    t = torch.tensor([int(x) for x in timesteps], device=backbone.device)
    z_t = backbone.add_noise(z_src.expand(len(t), -1, -1, -1), eps.expand(len(t), -1, -1, -1), t)
    with backbone.adapter_disabled() if pretrained else contextlib.nullcontext():
        emb = backbone.encode_prompt([prompt]).expand(len(t), -1, -1)
        with AttentionRecorder(backbone.unet, cross=layers) as rec:
            rec.token_indices = columns
            backbone.predict_eps(z_t, t, emb)
            maps = [_to_grid(rec.cross_maps[layer.name].sum(dim=-1), layer.divisor, z_src.shape[-2]) for layer in layers]
    return mask_from_maps(maps, tuple(z_src.shape[-2:]), threshold, dilation)


def _to_grid(flat: torch.Tensor, divisor: int, height: int) -> torch.Tensor:
    """``[B, HW]`` of a layer at latent/divisor -> ``[B, 1, h_l, w_l]`` (each stride-2 stage rounds up)."""
    h = height
    for _ in range(int(math.log2(divisor))):
        h = math.ceil(h / 2)
    return flat.reshape(flat.shape[0], 1, h, flat.shape[-1] // h)
