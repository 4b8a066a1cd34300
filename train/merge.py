"""`python -m train merge model.pretrained=<base> loras='[a,b]' weights='[1.0,0.5]' [out=...]`

Bakes one or several LoRAs into the base model's weights, ``W' = W + sum_i w_i * (alpha_i / r_i) * up_i @ down_i``
for every layer a LoRA touches (computed in float32, stored in the base's dtype), and writes the
result as a diffusers pipeline folder (the base's scheduler) plus the same weights as one SD
checkpoint (``sd_checkpoint.safetensors``) for A1111 / ComfyUI, ``merge.json`` recording the
inputs and a model card ``README.md``. A LoRA is one of our export folders, a diffusers / peft ``.safetensors`` file, or a
kohya / A1111 / ComfyUI file. An export trained on pivot words brings them: they join the merged model's vocabulary (its
tokenizer and text encoder) and its ``pivot/`` embedding files (for A1111 / ComfyUI, whose single file keeps the base
vocabulary).
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch
from omegaconf import DictConfig

from dreamsteer.checkpoints.adapter_io import MANIFEST, AdapterLoadError, check_adapter_folder, install_pivot, sha256_file
from dreamsteer.checkpoints.model_card import CARD, merge_card
from dreamsteer.checkpoints.formats import SINGLE_FILE, write_pipeline, write_pivot_files
from dreamsteer.checkpoints.lora_files import LoraWeights, lora_target_modules, read_lora, weight_delta
from dreamsteer.data.files import fsync_dir, make_temp_dir, write_json_atomic, write_text_atomic
from dreamsteer.diffusion.backbone import load_backbone
from dreamsteer.train.config import ConfigError, ModelConfig, check_output_dir, output_dir, resolve_device, validate

MERGE_RECORD = "merge.json"


@dataclass
class MergeConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    loras: List[str] = field(default_factory=list)  # export folders or .safetensors files
    weights: List[float] = field(default_factory=list)  # one per LoRA (default 1.0 each)
    out: Optional[str] = None  # the merged model folder; default: <output_dir>/merged
    output_dir: Optional[str] = None


def bake(module: torch.nn.Module, loras: list[tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]]) -> int:
    """Add ``w * up @ down`` of every LoRA to the matching layers of `module`; returns how many layers changed."""
    layers = dict(module.named_modules())
    touched = set()
    with torch.no_grad():
        for part, weight in loras:
            for name, (down, up) in part.items():
                layer = layers[name].weight
                delta = weight_delta(down, up, layer.shape)
                layer.copy_((layer.float() + weight * delta.to(layer.device)).to(layer.dtype))
                touched.add(name)
    return len(touched)


def _check_inputs(cfg: DictConfig) -> list[float]:
    if not cfg.loras:
        raise ConfigError("config key 'loras': give one or more LoRAs (export folders or .safetensors files), e.g. loras='[a.safetensors]'")
    for path in cfg.loras:
        if not Path(path).expanduser().exists():
            raise ConfigError(f"config key 'loras': {path} not found")
    weights = list(cfg.weights) or [1.0] * len(cfg.loras)
    if len(weights) != len(cfg.loras):
        raise ConfigError(f"config key 'weights': {len(weights)} weights for {len(cfg.loras)} LoRAs (one per LoRA, or none for 1.0 each)")
    return [float(w) for w in weights]


def _pivot_source(cfg: DictConfig) -> tuple[Path, dict] | None:
    """The one export among `loras` that carries pivot words, with its adapter.json's ``pivot`` (None when none does)."""
    carrying = []
    for path in cfg.loras:
        folder = Path(path).expanduser()
        if (folder / MANIFEST).is_file():
            try:
                manifest = check_adapter_folder(folder)
            except (OSError, AdapterLoadError) as err:
                raise ConfigError(f"config key 'loras': {err}") from None
            if manifest.get("pivot"):
                carrying.append((folder, manifest["pivot"]))
    if len(carrying) > 1:
        raise ConfigError(f"config key 'loras': {[str(f) for f, _ in carrying]} each carry pivot words; a merged model takes the words of one")
    return carrying[0] if carrying else None


def run(cfg: DictConfig) -> Path:
    cfg = validate(cfg, MergeConfig)
    weights = _check_inputs(cfg)
    pivot = _pivot_source(cfg)
    if cfg.output_dir:
        check_output_dir(cfg.output_dir)
    target = Path(cfg.out).expanduser() if cfg.out else output_dir(cfg) / "merged"
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConfigError(f"config key 'out': {target} exists and is not an empty folder; choose a new folder")
    check_output_dir(target, "out")

    backbone = load_backbone(cfg.model.pretrained, cfg.model.dtype, resolve_device(cfg.model.device), cfg.model.cache_dir, cfg.model.single_file_config)
    if backbone.family.name != "sd":
        raise ConfigError(f"config key 'model.pretrained': {cfg.model.pretrained} is an {backbone.family.name} model; "
                          "merge reads SD 1.x/2.x LoRA names only")
    unet_modules, text_modules = lora_target_modules(backbone.unet), lora_target_modules(backbone.text_encoder)
    read: list[LoraWeights] = [read_lora(Path(p).expanduser(), unet_modules, text_modules) for p in cfg.loras]
    changed_unet = bake(backbone.unet, [(lora.unet, w) for lora, w in zip(read, weights)])
    changed_text = bake(backbone.text_encoder, [(lora.text_encoder, w) for lora, w in zip(read, weights)])
    if pivot is not None:
        try:
            install_pivot(backbone, *pivot)
        except ValueError as err:  # words that do not fit this model (AdapterError, AdapterFormatError)
            raise ConfigError(f"config key 'loras': {pivot[0]}: its pivot words cannot join {cfg.model.pretrained} ({err})") from None

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(target.parent, f".{target.name}.tmp")
    try:
        files = write_pipeline(backbone, tmp)
        if pivot is not None:
            files += write_pivot_files(backbone, tmp)[0]
        record = {
            "base_model": backbone.source,
            "loras": [{"path": str(p), "weight": w} for p, w in zip(cfg.loras, weights)],
            "layers_changed": {"unet": changed_unet, "text_encoder": changed_text},
            "pivot": {**backbone.words.config, "from": str(pivot[0])} if pivot is not None else None,
            "files": {name: sha256_file(tmp / name) for name in files},
        }
        write_json_atomic(record, tmp / MERGE_RECORD)
        write_text_atomic(merge_card(record, target.name, SINGLE_FILE), tmp / CARD)
        if target.exists():
            target.rmdir()  # empty (checked above)
        os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"merged {len(read)} LoRA(s) into {backbone.source} ({changed_unet} UNet and {changed_text} text-encoder layers) -> {target}")
    return target
