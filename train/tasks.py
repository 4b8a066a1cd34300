"""The task registry: `python -m train <task>` runs `train.<module>.run(cfg)` with `conf/<task>.yaml`."""
from __future__ import annotations

import importlib
from typing import Any, Callable

# task name -> (module under train/, one-line description shown by `python -m train --help`)
TASKS: dict[str, tuple[str, str]] = {
    "demo": ("dreamsteer.train.demo", "the whole flow on the tiny model and a bundled photo"),
    "sample": ("dreamsteer.train.sample", "text-to-image samples from any model (and adapter)"),
    "personalize": ("dreamsteer.train.personalize", "DreamBooth / LoRA / Textual Inversion / Custom Diffusion on a few photos, exported"),
    "export": ("dreamsteer.train.export", "export an adapter folder (diffusers / A1111 / ComfyUI formats) from a personalize checkpoint"),
    "merge": ("dreamsteer.train.merge", "bake one or several LoRAs (with weights) into the base model: a diffusers folder + one SD checkpoint"),
    "convert": ("dreamsteer.train.convert", "convert a LoRA file between diffusers' and kohya's (A1111 / ComfyUI) formats"),
    "edit": ("dreamsteer.train.edit", "score-distillation editing (SDS/DDS/DDS-S/DDS-SM/CDS/SBP/PDS/LUSD/Ground-A-Score): one image or a jobs manifest on N GPUs"),
    "steer": ("dreamsteer.train.steer", "DreamSteerer: steer a personalized adapter toward one source photo, export it"),
    "generate": ("dreamsteer.train.generate", "layout-grounded images (GLIGEN boxes), sequential or ReGround's parallel wiring"),
    "pretrain": ("dreamsteer.train.pretrain", "train the toy text-to-image model from scratch (stage=vae|unet|gligen) on rendered scenes or captioned images"),
    "evaluate": ("dreamsteer.train.evaluate", "metrics (CLIP-T/R/AUC, L1*, CLIP-I*, LPIPS, SSIM, MS-SSIM, masked CLIP) + HTML report of edit runs"),
}


def task_function(name: str) -> Callable[[Any], Any]:
    module_name, _ = TASKS[name]
    return importlib.import_module(module_name).run
