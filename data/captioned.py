"""A folder of images with one caption file each (``cat.png`` + ``cat.txt``), for text-to-image training."""
from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from dreamsteer.data.images import list_images, load_image, load_image_tensor


class CaptionedFolder(Dataset):
    """Items ``{"pixel_values": [3, R, R] in [-1, 1], "caption", "phrases": [], "boxes": []}`` of every
    image in `folder` (center-cropped and resized to `resolution`) with its ``.txt`` caption.

    Raises ValueError naming the file when an image has no caption file or an empty one, and
    ImageLoadError for an unreadable image, all before training starts."""

    def __init__(self, folder: str | Path, resolution: int):
        self.resolution = resolution
        self.paths = list_images(folder)
        if not self.paths:
            raise ValueError(f"caption folder {folder}: holds no images (.png, .jpg, ...)")
        self.captions = []
        for path in self.paths:
            load_image(path)
            text = path.with_suffix(".txt")
            caption = text.read_text(encoding="utf-8").strip() if text.is_file() else ""
            if not caption:
                raise ValueError(f"image {path}: needs a non-empty caption file {text.name} beside it")
            self.captions.append(caption)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        import torch

        pixels = load_image_tensor(self.paths[index], self.resolution)
        return {"pixel_values": pixels, "caption": self.captions[index], "phrases": [], "boxes": torch.zeros(0, 4)}
