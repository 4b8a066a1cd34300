"""Bundled demo photos: real photographs that ship inside installed packages (scikit-image).

`write_sample_images` writes them as PNG files so every task reads them through the ordinary
image loader, exactly like a user's photos.
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from dreamsteer.data.images import save_image_atomic

# name -> skimage.data function; each is a real photograph shipped with scikit-image.
SAMPLE_PHOTOS = {
    "cat": "chelsea",
    "astronaut": "astronaut",
    "coffee": "coffee",
    "rocket": "rocket",
}


def sample_photo(name: str) -> Image.Image:
    """One bundled photo as an RGB PIL image."""
    import skimage.data

    if name not in SAMPLE_PHOTOS:
        raise ValueError(f"unknown sample photo {name!r}: expected one of {sorted(SAMPLE_PHOTOS)}")
    return Image.fromarray(getattr(skimage.data, SAMPLE_PHOTOS[name])()).convert("RGB")


def write_sample_images(directory: str | Path, names: list[str] | None = None) -> list[Path]:
    """Write bundled photos as `<directory>/<name>.png` (existing files are kept) and return the paths."""
    directory = Path(directory)
    paths = []
    for name in names or list(SAMPLE_PHOTOS):
        path = directory / f"{name}.png"
        if not path.is_file():
            save_image_atomic(sample_photo(name), path)
        paths.append(path)
    return paths


def write_subject_set(directory: str | Path, name: str = "cat", count: int = 4) -> list[Path]:
    """A small personalization set from one bundled photo: `count` different crops of it.

    Real users bring 3-20 photos of their subject; the demo makes a few views of the bundled cat.
    """
    directory = Path(directory)
    photo = sample_photo(name)
    w, h = photo.size
    side = min(w, h)
    paths = []
    for i in range(count):
        path = directory / f"{name}_{i:02d}.png"
        if not path.is_file():
            frac = 0.75 + 0.25 * (i % 2)
            crop = int(side * frac)
            left = int((w - crop) * (i / max(count - 1, 1)))
            top = (h - crop) // 2
            view = photo.crop((left, top, left + crop, top + crop))
            if i % 2:
                view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            save_image_atomic(view, path)
        paths.append(path)
    return paths
