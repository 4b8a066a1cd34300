"""Sample images of a `pretrain` run as it trains (``samples.every_n_steps``), as kohya's and OneTrainer's sample
prompts: every N steps and at the end, a grid ``<output_dir>/samples/step<N>.png`` of held-out scenes, each
one's truth above what the model makes of it, and numbers that say how close it is, printed, logged and written
beside it (``step<N>.json``).

- stage ``vae``: the reconstructions of the scenes (the posterior mean decoded, as the stage trains) and their
  mean absolute error in 8-bit levels;
- stage ``unet``: the EMA model's samples of the scenes' captions (DDIM, classifier-free guidance, each from its
  own seeded generator) read by the detector: the text-to-image floor's rates (`metrics.detector.caption_rates`:
  background, object color, shape, count of two-object captions).

The scenes are the toy world's, from seeds ``(SAMPLE_SCENES_SEED, 0, i + 1)``: keys no training run draws (those are
``(seed, index)`` pairs), so they are held out of every run. With ``data.source=folder`` they are the folder's
first images and captions instead (training images: there is no held-out set to draw) and there are no detector
numbers, which read only the toy world. Sampling runs on rank 0 with the global random state saved and restored,
so a run trains the same weights with or without it.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from tqdm.auto import tqdm

SAMPLE_SCENES_SEED = 12345


def held_out_scenes(count: int, resolution: int, two_tone_p: float = 0.0) -> tuple[list[Image.Image], list[str]]:
    """The toy world's held-out scenes of the samples: their images and captions (1-2 objects, the t2i floor's)."""
    from dreamsteer.data.scenes import random_scene

    # i + 1: numpy's seeding drops trailing zeros, so (seed, 0, 0) would be the training scene (seed, 0)
    scenes = [random_scene((SAMPLE_SCENES_SEED, 0, i + 1), resolution=resolution, two_tone_p=two_tone_p) for i in range(count)]
    return [s.image for s in scenes], [s.caption for s in scenes]


def folder_items(folder: str, count: int, resolution: int) -> tuple[list[Image.Image], list[str]]:
    """The first `count` images and captions of a caption folder."""
    from dreamsteer.data.captioned import CaptionedFolder
    from dreamsteer.data.images import tensor_to_pil

    data = CaptionedFolder(folder, resolution)
    items = [data[i] for i in range(min(count, len(data)))]
    return [tensor_to_pil(item["pixel_values"]) for item in items], [item["caption"] for item in items]


class SampleCallback(Callback):
    """Every `every` steps and at the end (rank 0): the stage's result on `truths` (module docstring), written to
    ``<folder>/step<N>.png`` with its numbers printed and logged under ``samples/``."""

    def __init__(self, folder: Path, every: int, truths: list[Image.Image], captions: list[str], read_scenes: bool,
                 steps: int, guidance: float, seed: int):
        self.folder, self.every, self.truths, self.captions, self.read_scenes = folder, every, truths, captions, read_scenes
        self.steps, self.guidance, self.seed = steps, guidance, seed
        self.last_step = -1

    def reconstructions(self, module: L.LightningModule) -> tuple[list[Image.Image], dict[str, float]]:
        from dreamsteer.data.images import pil_to_tensor, tensor_to_pil

        x = torch.stack([pil_to_tensor(image) for image in self.truths]).to(module.device)
        recon = module.vae.decode(module.vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        error = float((recon - x).abs().mean()) * 127.5  # [-1, 1] -> 8-bit levels
        return [tensor_to_pil(r) for r in recon], {"recon_error": error}

    def text_to_image(self, module: L.LightningModule) -> tuple[list[Image.Image], dict[str, float]]:
        from dreamsteer.diffusion.schedulers import make_scheduler
        from dreamsteer.metrics.detector import caption_agreement, caption_rates, detect

        pipe = module.export()
        pipe.scheduler = make_scheduler("ddim", pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        generators = [torch.Generator().manual_seed(self.seed + i) for i in range(len(self.captions))]
        images = pipe(self.captions, num_inference_steps=self.steps, guidance_scale=self.guidance, generator=generators).images
        if not self.read_scenes:
            return images, {}
        rates = caption_rates([caption_agreement(detect(image), caption) for image, caption in zip(images, self.captions)])
        return images, {name: rate for name, (rate, _) in rates.items()}

    def write(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        from dreamsteer.data.files import write_json_atomic
        from dreamsteer.data.images import image_grid, save_image_atomic
        from dreamsteer.lit_modules.pretrain import VaePretrainModule

        step = trainer.global_step
        if trainer.global_rank != 0 or step == self.last_step:
            return
        self.last_step = step
        cuda = [module.device] if module.device.type == "cuda" else []
        module.eval()
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            results, numbers = (self.reconstructions if isinstance(module, VaePretrainModule) else self.text_to_image)(module)
        module.train()
        # eight scenes a row: their truths, then the model's results below them
        rows = [image for start in range(0, len(results), 8) for row in (self.truths, results) for image in row[start:start + 8]]
        grid = image_grid(rows, columns=min(8, len(results)))
        path = save_image_atomic(grid, self.folder / f"step{step:06d}.png")
        write_json_atomic({"step": step, **numbers, "captions": self.captions}, path.with_suffix(".json"))
        said = ", ".join(f"{name} {value:.3f}" for name, value in numbers.items() if not math.isnan(value))
        tqdm.write(f"step {step} samples ({len(results)}): {said or 'written'} -> {path}")
        for logger in trainer.loggers:
            logger.log_metrics({f"samples/{name}": value for name, value in numbers.items()}, step=step)
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("samples", np.asarray(grid), step, dataformats="HWC")

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.every and trainer.global_step % self.every == 0:
            self.write(trainer, module)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.write(trainer, module)
