"""Loss masks for personalization from the base model's cross-attention (``data.masks=attention``)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from dreamsteer.data.images import load_image, pil_to_tensor, save_image_atomic
from dreamsteer.data.subject import InstanceItem
from dreamsteer.distill.subject_mask import subject_mask


@torch.no_grad()
def write_attention_masks(
    backbone: Any,
    items: Sequence[InstanceItem],
    instance_prompt: str,
    token: str,
    directory: str | Path,
    resolution: int,
    threshold: float = 0.3,
    dilation: int = 1,
    seed: int = 0,
) -> list[InstanceItem]:
    """Write ``<directory>/<image name>.mask.png`` for every item (existing files are kept) and return the items with them.

    Each image is resized to `resolution` x `resolution`, encoded (posterior mean) and given to
    ``distill.subject_mask`` with its caption (else `instance_prompt`) and `token`, with the adapter
    disabled (the base model); the binary latent mask is scaled back to the image's size (nearest).
    """
    directory = Path(directory)
    out = []
    for item in items:
        path = directory / f"{item.path.name}.mask.png"
        if not path.is_file():
            image = load_image(item.path)
            pixels = pil_to_tensor(image.resize((resolution, resolution), Image.Resampling.BICUBIC))[None]
            z = backbone.encode_image(pixels.to(backbone.device))
            mask = subject_mask(backbone, z, item.caption or instance_prompt, token, threshold=threshold, dilation=dilation, seed=seed).mask
            grey = Image.fromarray((mask[0, 0].float().cpu().numpy() * 255).astype(np.uint8))
            save_image_atomic(grey.resize(image.size, Image.Resampling.NEAREST), path)
        out.append(dataclasses.replace(item, mask=path))
    return out
