"""A diffusers Stable Diffusion 1.x/2.x or SDXL pipeline as one checkpoint in the original (CompVis/LDM, SGM) layout.

The layout A1111, ComfyUI and ``StableDiffusionPipeline.from_single_file`` read:

- UNet under ``model.diffusion_model.``: ``input_blocks.{k}`` with ``k = 1 + i*(L+1) + j`` for
  down block ``i``, layer ``j`` (``.0`` resnet, ``.1`` transformer) and ``k = (i+1)*(L+1)`` for its
  downsampler (``.0.op``); ``middle_block.{0,1,2}``; ``output_blocks.{i*(L+1)+j}`` for up block ``i``,
  layer ``j`` with the upsampler in the last one (after the transformer if there is one); resnets
  ``in_layers.{0,2}`` / ``emb_layers.1`` / ``out_layers.{0,3}`` / ``skip_connection``; ``time_embed.{0,2}``,
  ``input_blocks.0.0`` (conv_in), ``out.{0,2}``; SDXL's added-condition MLP ``add_embedding.linear_{1,2}``:
  ``label_emb.0.{0,2}``. Transformer blocks keep their diffusers names.
- VAE under ``first_stage_model.``: ``{encoder.down,decoder.up}.{i}.block.{j}`` (decoder blocks in
  reverse order), ``downsample`` / ``upsample``, ``mid.block_{1,2}``, ``mid.attn_1.{norm,q,k,v,proj_out}``
  as 1x1 convolutions, ``norm_out``, ``nin_shortcut``.
- Text encoder: SD 1.x ``cond_stage_model.transformer.text_model.*`` (Hugging Face CLIP names);
  SD 2.x ``cond_stage_model.model.*`` (OpenCLIP: ``transformer.resblocks.{i}.attn.in_proj_*`` = q, k, v
  stacked, ``ln_1/ln_2``, ``mlp.c_fc/c_proj``, ``positional_embedding``, ``ln_final``).
  SDXL: text encoder 1 under ``conditioner.embedders.0.transformer.text_model.*`` (Hugging Face CLIP names),
  text encoder 2 under ``conditioner.embedders.1.model.*`` (OpenCLIP names, plus ``text_projection`` =
  the transposed projection weight).
"""
from __future__ import annotations

from typing import Any

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _unet_prefix_map(config: Any) -> dict[str, str]:
    """diffusers module prefix -> LDM prefix for every block of a UNet2DConditionModel config."""
    layers = config["layers_per_block"]
    n = len(config["down_block_types"])
    has_attn_down = ["CrossAttn" in t for t in config["down_block_types"]]
    has_attn_up = ["CrossAttn" in t for t in config["up_block_types"]]
    mapping = {
        "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
        "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
        "mid_block.resnets.1": "middle_block.2",
    }
    if config.get("addition_embed_type") == "text_time":  # SDXL's pooled text + time_ids MLP
        mapping.update({"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"})
    for i in range(n):
        for j in range(layers):
            k = 1 + i * (layers + 1) + j
            mapping[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{k}.0"
            if has_attn_down[i]:
                mapping[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{k}.1"
        if i < n - 1:
            mapping[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(i + 1) * (layers + 1)}.0.op"
        for j in range(layers + 1):
            k = i * (layers + 1) + j
            mapping[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{k}.0"
            if has_attn_up[i]:
                mapping[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{k}.1"
        if i < n - 1:
            last = i * (layers + 1) + layers
            mapping[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{last}.{2 if has_attn_up[i] else 1}.conv"
    return mapping


def _rename(key: str, prefixes: dict[str, str], inner: dict[str, str] | None = None) -> str | None:
    """Replace the longest matching module prefix of `key` (and a resnet/attention sub-name)."""
    for old in sorted(prefixes, key=len, reverse=True):
        if key == old or key.startswith(old + "."):
            rest = key[len(old):]
            if inner and rest:
                sub, _, param = rest[1:].rpartition(".")
                if sub in inner:
                    rest = f".{inner[sub]}.{param}"
            return prefixes[old] + rest
    return None


def _check_unet_config(config: Any) -> None:
    if config.get("class_embed_type") or config.get("addition_embed_type") not in (None, "text_time"):
        raise ValueError("the original layout is written for SD 1.x/2.x and SDXL UNets (no class embeddings, "
                         f"addition_embed_type None or 'text_time'; got {config.get('addition_embed_type')!r})")


def unet_to_original(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    _check_unet_config(config)
    prefixes = _unet_prefix_map(config)
    out = {}
    for key, value in state.items():
        inner = _RESNET if ".resnets." in key else None
        new = _rename(key, prefixes, inner)
        if new is None:
            raise ValueError(f"single-file export: UNet weight {key!r} has no place in the SD layout")
        out[UNET_PREFIX + new] = value
    return out


def original_unet_module(module: str, config: Any) -> str:
    """A diffusers UNet module name (``down_blocks.1.attentions.0.proj_in``) in the original layout
    (``input_blocks.4.1.proj_in``), without ``model.diffusion_model.``: the names kohya gives SDXL LoRA modules."""
    _check_unet_config(config)
    new = _rename(module + ".weight", _unet_prefix_map(config), _RESNET if ".resnets." in module else None)
    if new is None:
        raise ValueError(f"UNet module {module!r} has no place in the original layout")
    return new[: -len(".weight")]


def vae_to_original(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    n = len(config["block_out_channels"])
    prefixes = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
    for part in ("encoder", "decoder"):
        prefixes.update({f"{part}.conv_in": f"{part}.conv_in", f"{part}.conv_out": f"{part}.conv_out",
                         f"{part}.conv_norm_out": f"{part}.norm_out", f"{part}.mid_block.resnets.0": f"{part}.mid.block_1",
                         f"{part}.mid_block.resnets.1": f"{part}.mid.block_2", f"{part}.mid_block.attentions.0": f"{part}.mid.attn_1"})
    for i in range(n):
        for j in range(config["layers_per_block"] + 1):
            prefixes[f"encoder.down_blocks.{i}.resnets.{j}"] = f"encoder.down.{i}.block.{j}"
            prefixes[f"decoder.up_blocks.{i}.resnets.{j}"] = f"decoder.up.{n - 1 - i}.block.{j}"
        prefixes[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"
        prefixes[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = f"decoder.up.{n - 1 - i}.upsample.conv"
    out = {}
    for key, value in state.items():
        attention = ".attentions." in key
        new = _rename(key, prefixes, _VAE_ATTENTION if attention else {"conv_shortcut": "nin_shortcut"})
        if new is None:
            raise ValueError(f"single-file export: VAE weight {key!r} has no place in the SD layout")
        if attention and value.dim() == 2:  # the original attention projections are 1x1 convolutions
            value = value[:, :, None, None]
        out[VAE_PREFIX + new] = value
    return out


def _with_text_model(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModel weights named ``text_model.*`` (transformers 5 drops the prefix, 4.x and files keep it)."""
    return {k if k.startswith("text_model.") else "text_model." + k: v for k, v in state.items()}


def clip_to_original(state: dict[str, torch.Tensor], prefix: str = CLIP_PREFIX) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in _with_text_model(state).items() if not k.endswith("position_ids")}


def open_clip_to_original(state: dict[str, torch.Tensor], prefix: str = OPEN_CLIP_PREFIX) -> dict[str, torch.Tensor]:
    """Hugging Face CLIP names -> OpenCLIP's under `prefix` (SD 2.x; SDXL's text encoder 2, whose projection
    ``text_projection.weight`` [P, D] is OpenCLIP's ``text_projection`` [D, P]); q, k, v stacked into ``in_proj``."""
    out = {}
    if "text_projection.weight" in state:
        out[prefix + "text_projection"] = state["text_projection.weight"].T.contiguous()
    state = _with_text_model({k: v for k, v in state.items() if k != "text_projection.weight"})
    fixed = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
             "text_model.embeddings.position_embedding.weight": "positional_embedding",
             "text_model.final_layer_norm.weight": "ln_final.weight", "text_model.final_layer_norm.bias": "ln_final.bias"}
    sub = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj"}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        if key in fixed:
            out[prefix + fixed[key]] = value
            continue
        head = "text_model.encoder.layers."
        if not key.startswith(head):
            raise ValueError(f"single-file export: text-encoder weight {key!r} has no place in the OpenCLIP layout")
        layer, _, rest = key[len(head):].partition(".")
        module, _, param = rest.rpartition(".")
        block = f"{prefix}transformer.resblocks.{layer}."
        if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            if module == "self_attn.q_proj":
                qkv = [state[f"{head}{layer}.self_attn.{p}_proj.{param}"] for p in "qkv"]
                out[f"{block}attn.in_proj_{param}"] = torch.cat(qkv)
            continue
        if module not in sub:
            raise ValueError(f"single-file export: text-encoder weight {key!r} has no place in the OpenCLIP layout")
        out[f"{block}{sub[module]}.{param}"] = value
    return out


def pipeline_to_original(unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module, v2: bool,
                         text_encoder_2: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """One state dict in the original SD layout (what A1111 / ComfyUI / ``from_single_file`` load); with
    `text_encoder_2` the SDXL layout (text encoder 1 as CLIP, text encoder 2 as OpenCLIP under ``conditioner.``)."""
    state = unet_to_original(unet.state_dict(), unet.config)
    state.update(vae_to_original(vae.state_dict(), vae.config))
    text = text_encoder.state_dict()
    if text_encoder_2 is not None:
        state.update(clip_to_original(text, SDXL_CLIP_PREFIX))
        state.update(open_clip_to_original(text_encoder_2.state_dict(), SDXL_OPEN_CLIP_PREFIX))
    else:
        state.update(open_clip_to_original(text) if v2 else clip_to_original(text))
    return state
