"""Sample grid of a toy model: each column a held-out random caption, the rendered truth on top and
the model's samples (DDIM, classifier-free guidance) below.

    python -m benchmarks.toy_grid --model toy --out docs/toy_samples.png
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image

from dreamsteer.data.images import save_image_atomic, tensor_to_pil
from dreamsteer.data.scenes import random_scene
from dreamsteer.diffusion.backbone import load_backbone
from dreamsteer.diffusion.schedulers import make_scheduler

HELD_OUT_SEED = 12345  # scenes of the grid come from seeds no training run uses


def sample_grid(model: str, columns: int = 8, rows: int = 2, steps: int = 25, guidance: float = 4.0, seed: int = 0, zoom: int = 3) -> Image.Image:
    backbone = load_backbone(model)
    pipe = backbone.pipeline(make_scheduler("ddim", backbone.scheduler.config))
    scenes = [random_scene((HELD_OUT_SEED, i)) for i in range(columns)]
    captions = [s.caption for s in scenes]
    size = backbone.resolution
    grid = Image.new("RGB", (columns * size, (rows + 1) * size), "white")
    for c, scene in enumerate(scenes):
        grid.paste(scene.image.resize((size, size)), (c * size, 0))
    generator = torch.Generator().manual_seed(seed)
    for r in range(rows):
        images = pipe(captions, num_inference_steps=steps, guidance_scale=guidance, generator=generator, output_type="pt").images
        for c, image in enumerate(images):
            grid.paste(tensor_to_pil(image * 2 - 1), (c * size, (r + 1) * size))
    for c, caption in enumerate(captions):
        print(f"column {c}: {caption}")
    return grid.resize((grid.width * zoom, grid.height * zoom), Image.Resampling.NEAREST)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy")
    parser.add_argument("--out", type=Path, default=Path("toy_samples.png"))
    parser.add_argument("--columns", type=int, default=8)
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    grid = sample_grid(args.model, args.columns, args.rows, args.steps, args.guidance, args.seed)
    save_image_atomic(grid, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
