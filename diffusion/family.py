"""Model families: the one place that knows how a family encodes prompts and conditions its UNet.

Every task holds a prompt's conditioning as ONE tensor ``[B, L', D]`` (so batching code can `cat`,
`chunk`, `expand` and index it without knowing the family), produced by `Family.encode` and turned into
the UNet's inputs by `Family.unet_inputs`:

- ``sd`` (SD 1.x / 2.x): the last hidden state of the text encoder, ``[B, 77, D]``; no added conditions.
- ``sdxl``: ``[B, 78, D]``: rows ``0..76`` are the penultimate hidden states of text encoder 1 and text
  encoder 2 concatenated on the feature axis (``D = D1 + D2``, 768 + 1280 for SDXL); row 77 is the pooled,
  projected embedding of text encoder 2 (``text_embeds``, ``P`` features, zero-padded to ``D``). The UNet
  gets ``added_cond_kwargs = {"text_embeds": pooled, "time_ids": original_size + crop_top_left +
  target_size}``; by default ``time_ids = (H, W, 0, 0, H, W)`` for the pixel size of the latent, as
  diffusers' SDXL pipeline uses for an uncropped image generated at its own size. With the model's
  ``force_zeros_for_empty_prompt`` (SDXL base: true) the empty prompt is all zeros, the unconditional
  input SDXL was trained with and its pipeline uses for classifier-free guidance.

Text-encoder modules are named as in a diffusers folder: ``text_encoder`` (and ``text_encoder_2``).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Sequence

import torch
import torch.nn.functional as F


class Family(ABC):
    """Prompt encoding and UNet conditioning of one model family (see the module docstring); the
    interface `SDFamily` and `SDXLFamily` implement."""

    name = "base"
    text_encoder_names: tuple[str, ...] = ("text_encoder",)
    pipeline_class = "StableDiffusionPipeline"

    def text_encoders(self, backbone: Any) -> list[tuple[str, Any, Any]]:
        """``(name, text encoder, tokenizer)`` of each text encoder, in the diffusers folder's order."""
        return [(name, getattr(backbone, name), getattr(backbone, name.replace("text_encoder", "tokenizer")))
                for name in self.text_encoder_names]

    @abstractmethod
    def encode(self, backbone: Any, prompts: Sequence[str]) -> torch.Tensor:
        """The one-tensor conditioning ``[B, L', D]`` of `prompts`."""

    @abstractmethod
    def split(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(encoder_hidden_states, pooled embedding or None)`` of a conditioning tensor."""

    @abstractmethod
    def unet_inputs(self, emb: torch.Tensor, latents: torch.Tensor, time_ids: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """``(encoder_hidden_states, extra UNet keyword arguments)`` for `emb` applied to `latents`."""

    @abstractmethod
    def pipeline_prompt_kwargs(self, cond: torch.Tensor, uncond: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The prompt keyword arguments of the family's diffusers pipeline for conditionings `cond` / `uncond`
        (None: the pipeline's own unconditional input)."""


class SDFamily(Family):
    """SD 1.x / 2.x: ``emb = text_encoder(ids).last_hidden_state``, the UNet reads it by cross-attention only."""

    name = "sd"

    def encode(self, backbone, prompts):
        return backbone.text_encoder(backbone.tokenize(prompts))[0]

    def split(self, emb):
        return emb, None

    def unet_inputs(self, emb, latents, time_ids=None):
        if time_ids is not None:
            raise ValueError("time_ids are an SDXL added condition; this SD 1.x/2.x model has none")
        return emb, {}

    def pipeline_prompt_kwargs(self, cond, uncond=None):
        return {"prompt_embeds": cond, "negative_prompt_embeds": uncond}


class SDXLFamily(Family):
    """SDXL: two text encoders, a pooled text embedding and ``time_ids`` as added conditions.

    ``emb = [h1_{-2} ++ h2_{-2} ; pad(text_embeds_2)]`` (see the module docstring);
    ``time_ids = (orig_h, orig_w, crop_top, crop_left, target_h, target_w)``.
    """

    name = "sdxl"
    text_encoder_names = ("text_encoder", "text_encoder_2")
    pipeline_class = "StableDiffusionXLPipeline"

    def __init__(self, pooled_dim: int, hidden_dim: int, vae_scale_factor: int, zero_empty_prompt: bool = True):
        if pooled_dim > hidden_dim:
            raise ValueError(f"SDXL model: the pooled text embedding ({pooled_dim} features) is wider than the hidden "
                             f"states ({hidden_dim}); it cannot be carried as their last row")
        self.pooled_dim = int(pooled_dim)
        self.hidden_dim = int(hidden_dim)
        self.vae_scale_factor = int(vae_scale_factor)
        self.zero_empty_prompt = bool(zero_empty_prompt)

    def encode(self, backbone, prompts):
        prompts = list(prompts)
        hidden = []
        for _, encoder, tokenizer in self.text_encoders(backbone):
            out = encoder(backbone.tokenize(prompts, tokenizer), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
        pooled = out.text_embeds  # text encoder 2 (CLIPTextModelWithProjection)
        emb = self.pack(torch.cat(hidden, dim=-1), pooled)
        if self.zero_empty_prompt and "" in prompts:
            keep = torch.tensor([p != "" for p in prompts], device=emb.device).reshape(-1, 1, 1)
            emb = emb * keep.to(emb.dtype)
        return emb

    def pack(self, hidden: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """``[B, L, D]`` hidden states and ``[B, P]`` pooled embedding -> the ``[B, L + 1, D]`` conditioning."""
        row = F.pad(pooled.to(hidden.dtype), (0, hidden.shape[-1] - pooled.shape[-1]))
        return torch.cat([hidden, row[:, None]], dim=1)

    def split(self, emb):
        return emb[:, :-1], emb[:, -1, : self.pooled_dim]

    def time_ids(self, original_size: Sequence[int], crop_top_left: Sequence[int], target_size: Sequence[int]) -> torch.Tensor:
        """``[6]``: ``original_size + crop_top_left + target_size`` (each (height, width) / (top, left))."""
        return torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)

    def default_time_ids(self, latents: torch.Tensor) -> torch.Tensor:
        """``[B, 6]``: an uncropped image of the latents' pixel size, generated at that size."""
        size = (latents.shape[-2] * self.vae_scale_factor, latents.shape[-1] * self.vae_scale_factor)
        return self.time_ids(size, (0, 0), size).to(latents.device).expand(latents.shape[0], 6)

    def unet_inputs(self, emb, latents, time_ids=None):
        hidden, pooled = self.split(emb)
        if time_ids is None:
            time_ids = self.default_time_ids(latents)
        time_ids = time_ids.to(latents.device, hidden.dtype).reshape(-1, 6).expand(hidden.shape[0], 6)
        return hidden, {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}

    def pipeline_prompt_kwargs(self, cond, uncond=None):
        hidden, pooled = self.split(cond)
        kwargs = {"prompt_embeds": hidden, "pooled_prompt_embeds": pooled}
        if uncond is not None:
            neg_hidden, neg_pooled = self.split(uncond)
            kwargs.update(negative_prompt_embeds=neg_hidden, negative_pooled_prompt_embeds=neg_pooled)
        return kwargs


def family_of(unet: Any, text_encoder_2: Any = None, vae: Any = None, zero_empty_prompt: bool = True) -> Family:
    """The family of a model from its components: SDXL when the UNet takes ``text_time`` added conditions."""
    config = unet.config
    if getattr(config, "addition_embed_type", None) == "text_time":
        if text_encoder_2 is None or vae is None:
            raise ValueError("an SDXL UNet (addition_embed_type='text_time') needs text_encoder_2 and the VAE")
        hidden_dim = int(config.cross_attention_dim if isinstance(config.cross_attention_dim, int) else config.cross_attention_dim[0])
        return SDXLFamily(int(text_encoder_2.config.projection_dim), hidden_dim,
                          2 ** (len(vae.config.block_out_channels) - 1), zero_empty_prompt)
    if getattr(config, "addition_embed_type", None) is not None or getattr(config, "class_embed_type", None) is not None:
        raise ValueError(f"UNet with addition_embed_type={config.addition_embed_type!r}, class_embed_type="
                         f"{config.class_embed_type!r}: not an SD 1.x/2.x or SDXL text-to-image UNet")
    return SDFamily()
