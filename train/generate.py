"""`python -m train generate`: layout-grounded images from a GLIGEN model, sequential or ReGround wiring.

Writes per image ``<wiring>_<i>.png`` and ``<wiring>_<i>_boxes.png`` (the boxes and phrases drawn);
with ``wiring=both`` also ``both_<i>.png`` / ``both_<i>_boxes.png`` (left: sequential, right: parallel,
same seed), a ``generate.json`` manifest, and TensorBoard logs under ``tensorboard/``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image, ImageDraw, ImageFont

from dreamsteer.data.files import write_json_atomic
from dreamsteer.data.images import save_image_atomic, tensor_to_pil
from dreamsteer.diffusion.backbone import load_backbone, set_progress_bars
from dreamsteer.diffusion.gligen import require_gligen, validate_layout
from dreamsteer.diffusion.reground import grounded_sample, grounding_steps
from dreamsteer.diffusion.schedulers import SCHEDULERS
from dreamsteer.train.config import (
    ConfigError,
    LoggerConfig,
    ModelConfig,
    check_choice,
    check_common,
    output_dir,
    resolve_device,
    validate,
)
from dreamsteer.train.lock import output_lock
from dreamsteer.train.logs import summary_writer

WIRING_CHOICES = ("sequential", "parallel", "both")
# Distinct box colours (cycled), readable on most backgrounds.
BOX_COLORS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230), (255, 225, 25))


@dataclass
class GenerateConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(pretrained="tiny-gligen"))
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    prompt: str = "a photo of a cat and a dog on the grass"
    phrases: list[str] = field(default_factory=lambda: ["a cat", "a dog"])
    boxes: list[list[float]] = field(default_factory=lambda: [[0.05, 0.3, 0.45, 0.9], [0.55, 0.3, 0.95, 0.9]])
    wiring: str = "parallel"
    beta: float = 0.3
    num_images: int = 1
    steps: int = 25
    guidance_scale: float = 7.5
    negative_prompt: str = ""
    scheduler: str = "ddim"
    seed: int = 0
    output_dir: Optional[str] = None
    progress: bool = True


def draw_boxes(image: Image.Image, boxes: Sequence[Sequence[float]], phrases: Sequence[str]) -> Image.Image:
    """A copy of `image` with each box ``[x0, y0, x1, y1]`` (fractions) outlined and labelled with its phrase."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    w, h = out.size
    width = max(1, round(min(w, h) / 128))
    font = ImageFont.load_default()
    for i, (box, phrase) in enumerate(zip(boxes, phrases)):
        color = BOX_COLORS[i % len(BOX_COLORS)]
        x0, y0, x1, y1 = round(box[0] * w), round(box[1] * h), round(box[2] * w), round(box[3] * h)
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=color, width=width)
        left, top, right, bottom = draw.textbbox((x0 + width, y0 + width), phrase, font=font)
        draw.rectangle([left - 1, top - 1, right + 1, bottom + 1], fill=color)
        draw.text((x0 + width, y0 + width), phrase, fill=(255, 255, 255), font=font)
    return out


def side_by_side(left: Image.Image, right: Image.Image, gap: int = 4) -> Image.Image:
    """`left` and `right` next to each other on a white canvas, `gap` pixels apart."""
    canvas = Image.new("RGB", (left.width + gap + right.width, max(left.height, right.height)), (255, 255, 255))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width + gap, 0))
    return canvas


def _check(cfg: DictConfig) -> tuple[list[str], list[list[float]]]:
    """Every check that needs no model, so bad input fails before loading or compute."""
    check_common(cfg)
    check_choice(cfg, "wiring", WIRING_CHOICES)
    check_choice(cfg, "scheduler", SCHEDULERS)
    for key in ("num_images", "steps"):
        if cfg[key] < 1:
            raise ConfigError(f"config key '{key}': {cfg[key]} must be >= 1")
    if not 0.0 <= cfg.beta <= 1.0:
        raise ConfigError(f"config key 'beta': {cfg.beta} is the grounded fraction of the steps and must lie in [0, 1]")
    return validate_layout(list(cfg.phrases), [list(b) for b in cfg.boxes])


def run(cfg: DictConfig) -> dict[str, Any]:
    cfg = validate(cfg, GenerateConfig)
    set_progress_bars(cfg.progress)
    phrases, boxes = _check(cfg)
    wirings = ["sequential", "parallel"] if cfg.wiring == "both" else [cfg.wiring]

    device = resolve_device(cfg.model.device)
    backbone = load_backbone(cfg.model.pretrained, cfg.model.dtype, device, cfg.model.cache_dir, cfg.model.single_file_config)
    require_gligen(backbone.unet, cfg.model.pretrained)
    out = output_dir(cfg)
    with output_lock(out, "generate"):
        images: dict[str, list[Image.Image]] = {}
        seconds: dict[str, float] = {}
        for wiring in wirings:
            generator = torch.Generator(device="cpu").manual_seed(cfg.seed)  # the same noise for every wiring
            start = time.perf_counter()
            latents = grounded_sample(
                backbone, cfg.prompt, phrases, boxes, wiring, cfg.beta, cfg.steps, generator,
                guidance_scale=cfg.guidance_scale, negative_prompt=cfg.negative_prompt, scheduler=cfg.scheduler,
                num_images=cfg.num_images, progress=cfg.progress,
            )
            with torch.no_grad():
                decoded = backbone.decode(latents)
            seconds[wiring] = time.perf_counter() - start
            images[wiring] = [tensor_to_pil(x) for x in decoded]

        files: dict[str, list[str]] = {}
        boxed: dict[str, list[Image.Image]] = {}
        for wiring, batch in images.items():
            boxed[wiring] = [draw_boxes(im, boxes, phrases) for im in batch]
            files[wiring] = [save_image_atomic(im, out / f"{wiring}_{i:03d}.png").name for i, im in enumerate(batch)]
            files[f"{wiring}_boxes"] = [save_image_atomic(im, out / f"{wiring}_{i:03d}_boxes.png").name for i, im in enumerate(boxed[wiring])]
        manifest: dict[str, Any] = {
            "model": cfg.model.pretrained,
            "prompt": cfg.prompt,
            "negative_prompt": cfg.negative_prompt,
            "phrases": phrases,
            "boxes": boxes,
            "wiring": cfg.wiring,
            "beta": cfg.beta,
            "grounding_steps": grounding_steps(cfg.beta, cfg.steps),
            "steps": cfg.steps,
            "guidance_scale": cfg.guidance_scale,
            "scheduler": cfg.scheduler,
            "seed": cfg.seed,
            "seconds": seconds,
            "files": files,
        }
        if cfg.wiring == "both":
            pairs = list(zip(images["sequential"], images["parallel"]))
            boxed_pairs = list(zip(boxed["sequential"], boxed["parallel"]))
            files["both"] = [save_image_atomic(side_by_side(a, b), out / f"both_{i:03d}.png").name for i, (a, b) in enumerate(pairs)]
            files["both_boxes"] = [save_image_atomic(side_by_side(a, b), out / f"both_{i:03d}_boxes.png").name for i, (a, b) in enumerate(boxed_pairs)]
            # How much the rewiring changed the pixels (0-255 scale), averaged over the images.
            manifest["mean_abs_pixel_diff"] = float(np.mean([np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean() for a, b in pairs]))
        write_json_atomic(manifest, out / "generate.json")

        writer = summary_writer(cfg, out)
        if writer is not None:
            for wiring in images:
                writer.add_images(f"{wiring}/images", np.stack([np.asarray(im) for im in images[wiring]]), 0, dataformats="NHWC")
                writer.add_images(f"{wiring}/boxes", np.stack([np.asarray(im) for im in boxed[wiring]]), 0, dataformats="NHWC")
                writer.add_scalar(f"{wiring}/seconds", seconds[wiring], 0)
            if "mean_abs_pixel_diff" in manifest:
                writer.add_scalar("both/mean_abs_pixel_diff", manifest["mean_abs_pixel_diff"], 0)
            writer.add_text("layout", "\n".join(f"- {p}: {b}" for p, b in zip(phrases, boxes)), 0)
            writer.add_text("config", f"```\n{OmegaConf.to_yaml(cfg)}\n```", 0)
            writer.close()
        print(f"wrote {sum(len(v) for v in files.values())} images ({', '.join(wirings)}) to {out}")
        return manifest
