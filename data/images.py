"""The one image loader of the project: any file PIL reads -> RGB, oriented, at the model resolution.

Every task reads images through `load_image` (PIL) or `load_image_tensor` ([-1, 1] tensor), so
EXIF orientation, mode conversion (RGBA, LA, L, P, CMYK, I;16, I, F) and resizing are handled in
one place, and a bad file fails with an error that names it.

Images over PIL's decompression-bomb limit (``2 * PIL.Image.MAX_IMAGE_PIXELS``, about 179 megapixels)
are refused before they are decoded; images between the warning and that limit are read silently.
"""
from __future__ import annotations

import contextlib
import os
import re
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from dreamsteer.data.files import atomic_write

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
MIN_SIDE = 32


class ImageLoadError(ValueError):
    """An image file that cannot be used; the message names the file and the reason."""


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparent pixels are composited over white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        # 16-bit and float images are scaled by their own range: their nominal range varies by source.
        arr = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo)
        image = Image.fromarray((arr * 255.0 + 0.5).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def pixel_limit() -> int:
    """The most pixels an image may have: PIL's decompression-bomb error threshold."""
    return 2 * int(Image.MAX_IMAGE_PIXELS or 0) or 2**62


@contextlib.contextmanager
def _open(path: Path) -> Iterator[Image.Image]:
    """`Image.open(path)` (the header only) with every failure turned into an ImageLoadError naming the file."""
    if path.is_dir():
        raise ImageLoadError(f"image {path}: is a folder, not an image file")
    if not path.is_file():
        raise ImageLoadError(f"image {path}: file not found")
    if path.stat().st_size == 0:
        raise ImageLoadError(f"image {path}: file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                yield image
    except Image.DecompressionBombError as err:
        found = re.search(r"\((\d+) pixels\)", str(err))
        size = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
        raise ImageLoadError(f"image {path}: {size}, over the limit of {pixel_limit():,} pixels "
                             "(PIL's decompression-bomb guard); downscale it first") from None
    except UnidentifiedImageError as err:
        raise ImageLoadError(f"image {path}: not an image file PIL can read") from err
    except (OSError, SyntaxError, ValueError) as err:
        if isinstance(err, ImageLoadError):
            raise
        raise ImageLoadError(f"image {path}: corrupt or truncated ({err})") from err


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding it; ImageLoadError names an unusable file."""
    with _open(Path(path)) as image:
        return image.size


def load_image(path: str | os.PathLike, min_side: int = MIN_SIDE) -> Image.Image:
    """Read `path` as an RGB PIL image with EXIF orientation applied.

    Raises ImageLoadError naming the file when it is missing, a folder, empty, not an image, corrupt,
    over the pixel limit, or smaller than `min_side` pixels on a side.
    """
    path = Path(path)
    with _open(path) as image:
        image.load()
        image = ImageOps.exif_transpose(image)
        rgb = _to_rgb(image)
    if min(rgb.size) < min_side:
        raise ImageLoadError(f"image {path}: {rgb.size[0]}x{rgb.size[1]} is too small (each side must be >= {min_side} px)")
    return rgb


def resize_and_crop(image: Image.Image, size: int, center: bool = True, generator: torch.Generator | None = None) -> Image.Image:
    """Resize the short side to `size` (bicubic), then crop a `size` x `size` square (center or random)."""
    w, h = image.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    if center:
        left, top = (new_w - size) // 2, (new_h - size) // 2
    else:
        left = int(torch.randint(0, new_w - size + 1, (1,), generator=generator))
        top = int(torch.randint(0, new_h - size + 1, (1,), generator=generator))
    return image.crop((left, top, left + size, top + size))


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor [3, H, W] in [-1, 1]."""
    arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def tensor_to_pil(image: torch.Tensor) -> Image.Image:
    """Tensor [3, H, W] in [-1, 1] -> RGB PIL image."""
    arr = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(arr.permute(1, 2, 0).cpu().numpy())


def load_image_tensor(path: str | os.PathLike, size: int, center: bool = True) -> torch.Tensor:
    """`load_image`, resized and cropped to `size`, as a [3, size, size] tensor in [-1, 1]."""
    return pil_to_tensor(resize_and_crop(load_image(path), size, center=center))


def list_images(directory: str | os.PathLike) -> list[Path]:
    """Image files directly inside `directory`, sorted by name (non-image files are ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ImageLoadError(f"image folder {directory}: not found or not a folder")
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def save_image_atomic(image: Image.Image, path: str | os.PathLike) -> Path:
    """Write a PNG through a temp file in the same folder, then rename it into place."""
    with atomic_write(path) as f:
        image.save(f, format="PNG")
    return Path(path)


def image_grid(images: Sequence[Image.Image], columns: int = 8, min_size: int = 96) -> Image.Image:
    """Images side by side in rows of `columns` (2-pixel white gaps), enlarged without smoothing to at
    least `min_size` pixels (toy images are 32 px)."""
    size = max(images[0].size[0], min_size)
    rows = -(-len(images) // columns)
    canvas = Image.new("RGB", (columns * (size + 2), rows * (size + 2)), "white")
    for i, image in enumerate(images):
        canvas.paste(image.convert("RGB").resize((size, size), Image.Resampling.NEAREST), ((i % columns) * (size + 2), (i // columns) * (size + 2)))
    return canvas


def save_image_grid(images: Sequence[Image.Image], path: str | os.PathLike, columns: int = 8, min_size: int = 96) -> Path:
    """`image_grid` written with `save_image_atomic`."""
    return save_image_atomic(image_grid(images, columns, min_size), path)
