"""`python -m train sample`: text-to-image samples from any model, written as PNGs and to TensorBoard."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from dreamsteer.data.images import save_image_atomic
from dreamsteer.diffusion.backbone import load_backbone, set_progress_bars
from dreamsteer.diffusion.schedulers import SCHEDULERS, make_scheduler
from dreamsteer.train.config import LoggerConfig, ModelConfig, check_choice, check_common, output_dir, resolve_device, validate
from dreamsteer.train.lock import output_lock
from dreamsteer.train.logs import summary_writer


@dataclass
class SampleConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    prompt: str = "a photo of a cat"
    negative_prompt: str = ""
    num_images: int = 2
    steps: int = 25
    guidance_scale: float = 7.5
    scheduler: str = "ddim"
    seed: int = 0
    adapter: str | None = None  # an export folder (adapter.json inside), loaded with checkpoints.load_adapter
    output_dir: str | None = None
    progress: bool = True


def run(cfg: DictConfig) -> list[Path]:
    cfg = validate(cfg, SampleConfig)
    set_progress_bars(cfg.progress)
    check_common(cfg)
    check_choice(cfg, "scheduler", SCHEDULERS)
    if cfg.num_images < 1 or cfg.steps < 1:
        raise ValueError("config keys 'num_images' and 'steps' must be >= 1")

    if cfg.adapter:
        from dreamsteer.checkpoints.adapter_io import check_adapter_folder

        check_adapter_folder(cfg.adapter)  # adapter.json and the files' hashes, before the model loads
    backbone = load_backbone(cfg.model.pretrained, cfg.model.dtype, resolve_device(cfg.model.device), cfg.model.cache_dir, cfg.model.single_file_config)
    if cfg.adapter:
        from dreamsteer.checkpoints import load_adapter

        manifest = load_adapter(backbone, cfg.adapter)
        print(f"loaded {manifest['method']} adapter from {cfg.adapter} (tokens: {manifest.get('tokens') or '-'})")
    out = output_dir(cfg)
    with output_lock(out, "sample"):
        pipe = backbone.pipeline(make_scheduler(cfg.scheduler, backbone.scheduler.config))
        pipe.set_progress_bar_config(disable=not cfg.progress, desc="sampling")
        generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
        cond = backbone.encode_prompt([cfg.prompt] * cfg.num_images)
        uncond = backbone.encode_prompt([cfg.negative_prompt] * cfg.num_images) if cfg.negative_prompt else None
        images = pipe(  # prompts encoded by the backbone: one tokenization path for every task and model family
            **backbone.pipeline_prompt_kwargs(cond, uncond),
            num_inference_steps=cfg.steps,
            guidance_scale=cfg.guidance_scale,
            generator=generator,
        ).images

        paths = [save_image_atomic(image, out / f"sample_{i:03d}.png") for i, image in enumerate(images)]
        writer = summary_writer(cfg, out)
        if writer is not None:
            batch = np.stack([np.asarray(image) for image in images])
            writer.add_images("samples", batch, global_step=0, dataformats="NHWC")
            writer.add_text("config", f"```\n{OmegaConf.to_yaml(cfg)}\n```", global_step=0)
            writer.close()
        print(f"wrote {len(paths)} images to {out}")
        return paths
