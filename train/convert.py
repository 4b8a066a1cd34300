"""`python -m train convert lora=<file or export folder> to=kohya|diffusers out=<file.safetensors> [model.pretrained=<base>]`

Converts a LoRA made elsewhere between diffusers' format (``pipe.load_lora_weights``) and kohya's
(A1111 / ComfyUI / kohya). Module names are resolved against the base model's architecture, built
from its configs on the meta device (no weights are loaded), so a name is never guessed. Each
module's ``alpha / rank`` is folded into its up weight, so the output means the same update at
scale 1; the kohya file gets kohya's metadata (``ss_v2`` ... and the hashes).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig

from dreamsteer.checkpoints import formats, kohya
from dreamsteer.checkpoints.adapter_io import MANIFEST, read_manifest
from dreamsteer.checkpoints.lora_files import lora_target_modules, read_lora
from dreamsteer.data.files import make_temp_dir
from dreamsteer.diffusion.backbone import resolve_model_source
from dreamsteer.train.config import ConfigError, ModelConfig, check_choice, validate

TARGETS = ("kohya", "diffusers")


@dataclass
class ConvertConfig:
    model: ModelConfig = field(default_factory=ModelConfig)  # the base model the LoRA was trained on (a diffusers folder)
    lora: str = "???"  # a .safetensors LoRA file or one of our export folders
    to: str = "kohya"  # kohya | diffusers
    out: str = "???"  # the .safetensors file to write (must not exist)


def meta_model(source: str, cache_dir: Optional[str] = None) -> tuple[torch.nn.Module, torch.nn.Module, dict[str, Any]]:
    """The base's UNet and text encoder on the meta device (architecture only) and its scheduler config."""
    import json

    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(resolve_model_source(source, cache_dir)).expanduser()
    for part in ("unet/config.json", "text_encoder/config.json", "scheduler/scheduler_config.json"):
        if not (folder / part).is_file():
            raise ConfigError(f"config key 'model.pretrained': {folder} is not a diffusers model folder (no {part})")
    if (folder / "text_encoder_2").is_dir():
        raise ConfigError(f"config key 'model.pretrained': {folder} is an SDXL model; convert reads SD 1.x/2.x LoRA names only "
                          "(our SDXL exports already hold both the diffusers and the kohya file)")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(folder / "unet")))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(str(folder / "text_encoder")))
    return unet, text_encoder, json.loads((folder / "scheduler" / "scheduler_config.json").read_text())


def run(cfg: DictConfig) -> Path:
    cfg = validate(cfg, ConvertConfig)
    check_choice(cfg, "to", TARGETS)
    for key in ("lora", "out"):
        if cfg[key] in (None, "", "???"):
            raise ConfigError(f"config key '{key}': required")
    source, out = Path(cfg.lora).expanduser(), Path(cfg.out).expanduser()
    if not source.exists():
        raise ConfigError(f"config key 'lora': {source} not found")
    if out.suffix != ".safetensors":
        raise ConfigError(f"config key 'out': {out} must be a .safetensors file")
    if out.exists():
        raise ConfigError(f"config key 'out': {out} exists; choose a new file name")

    unet, text_encoder, scheduler = meta_model(cfg.model.pretrained, cfg.model.cache_dir)
    weights = read_lora(source, lora_target_modules(unet), lora_target_modules(text_encoder))
    unet_state, text_state = weights.peft_states()
    if cfg.to == "kohya":
        # the scale is folded into the up weights: alpha = rank for every module
        unet_ranks, text_ranks = _module_ranks(unet_state), _module_ranks(text_state)
        rank = max([*unet_ranks.values(), *text_ranks.values()])
        tensors = kohya.peft_to_kohya(unet_state, kohya.UNET_PREFIX, unet_ranks, text_encoder=False)
        tensors.update(kohya.peft_to_kohya(text_state, kohya.TEXT_PREFIX, text_ranks, text_encoder=True))
        metadata = kohya.lora_metadata(
            tensors, rank=rank, alpha=rank, v2=kohya.is_sd2(text_encoder.config),
            v_prediction=scheduler.get("prediction_type") == "v_prediction", base_model=str(cfg.model.pretrained),
            output_name=out.stem, resolution=None, steps=None,
        )
        formats.save_safetensors(tensors, out, metadata)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = make_temp_dir(out.parent, f".{out.name}.tmp")
        try:
            formats.save_diffusers_lora(tmp, unet_state, text_state, None, None)  # no alphas: diffusers reads scale 1
            (tmp / formats.LORA_FILE).replace(out)
        finally:
            for leftover in tmp.iterdir():
                leftover.unlink()
            tmp.rmdir()
    print(f"converted {source} ({len(weights.unet)} UNet and {len(weights.text_encoder)} text-encoder modules) to {cfg.to}: {out}")
    _note_pivot_words(source)
    return out


def _note_pivot_words(source: Path) -> None:
    """A converted file holds the LoRA alone: say where the words an export was trained on are."""
    if not (source / MANIFEST).is_file():
        return
    pivot = read_manifest(source).get("pivot")
    if pivot:
        print(f"note: {source} was trained on the pivot words {pivot['tokens']}; {', '.join(sorted(pivot['token_files'].values()))} "
              "there hold them (diffusers: load_textual_inversion before the LoRA; A1111 / ComfyUI: pivot/a1111/ as embeddings)")


def _module_ranks(state: dict[str, torch.Tensor]) -> dict[str, int]:
    return {k[: -len(".lora_A.weight")]: v.shape[0] for k, v in state.items() if k.endswith(".lora_A.weight")}
