"""The DINO image similarity (MagicBrush / LUSD Appendix 9.3): cosine of DINO ViT [CLS] embeddings.

The model loads through transformers (`AutoModel`, e.g. a local copy of `facebook/dino-vits16`).
Preprocessing is the one LUSD's evaluation script uses for DINO, written with PIL (no torchvision):
resize the short side to 256/224 of the model's input size (bicubic), center crop, ImageNet
mean/std normalization.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

from dreamsteer.metrics.clip import ModelUnavailableError, load_pretrained

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DinoEmbedder:
    """Unit-length DINO embeddings: the final-layer-normalized [CLS] token of a ViT, e(x) = CLS(ViT(x)) / ||.||."""

    def __init__(self, model, device: str = "cpu", source: str = "", batch_size: int = 16):
        self.model = model.to(device).eval().requires_grad_(False)
        self.device = device
        self.source = source
        self.batch_size = batch_size
        self.size = int(model.config.image_size)

    @classmethod
    def load(cls, source: str, device: str = "cpu", batch_size: int = 16) -> "DinoEmbedder":
        """Load a ViT from a local folder or hub id; raises ModelUnavailableError naming `source`."""
        from transformers import AutoModel

        model = load_pretrained("DINO", source, lambda src: AutoModel.from_pretrained(src, use_safetensors=True))
        if not hasattr(model.config, "image_size"):
            raise ModelUnavailableError(f"DINO model {source}: not a vision transformer (config has no image_size)")
        return cls(model, device, source, batch_size)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """Resize short side to round(size * 256 / 224) (bicubic), center crop `size`, normalize -> [3, size, size]."""
        image = image.convert("RGB")
        short = round(self.size * 256 / 224)
        w, h = image.size
        scale = short / min(w, h)
        image = image.resize((max(short, round(w * scale)), max(short, round(h * scale))), Image.Resampling.BICUBIC)
        left, top = (image.width - self.size) // 2, (image.height - self.size) // 2
        image = image.crop((left, top, left + self.size, top + self.size))
        arr = (np.asarray(image, dtype=np.float32) / 255.0 - np.array(IMAGENET_MEAN, dtype=np.float32)) / np.array(IMAGENET_STD, dtype=np.float32)
        return torch.from_numpy(arr).permute(2, 0, 1)

    @torch.no_grad()
    def images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """[N, D] unit-length embeddings (float32, CPU)."""
        out = []
        for i in range(0, len(images), self.batch_size):
            pixels = torch.stack([self.preprocess(im) for im in images[i : i + self.batch_size]]).to(self.device)
            out.append(self.model(pixel_values=pixels).last_hidden_state[:, 0].float().cpu())
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)
