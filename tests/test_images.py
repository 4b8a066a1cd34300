"""The image loader on every PIL mode we promise, EXIF orientation, and bad files."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dreamsteer.data.images import ImageLoadError, list_images, load_image, load_image_tensor, resize_and_crop, save_image_atomic
from dreamsteer.data.samples import sample_photo, write_sample_images


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "CMYK", "I;16", "I", "F", "1"])
def test_every_mode_becomes_rgb(tmp_path, mode):
    rgb = Image.fromarray((np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8))
    image = rgb.convert("L").convert(mode) if mode in ("I;16", "I", "F") else rgb.convert(mode)
    suffix = ".tiff" if mode in ("CMYK", "I;16", "I", "F") else ".png"
    path = tmp_path / f"img{suffix}"
    image.save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (48, 40)


def test_sixteen_bit_uses_full_range(tmp_path):
    arr = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(arr).save(path)
    loaded = np.asarray(load_image(path))
    assert loaded.min() == 0 and loaded.max() == 255


def test_transparent_pixels_become_white(tmp_path):
    image = Image.new("RGBA", (40, 40), (10, 20, 30, 0))
    path = tmp_path / "clear.png"
    image.save(path)
    assert load_image(path).getpixel((5, 5)) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (60, 40), (255, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif)
    assert load_image(path).size == (40, 60)


def test_missing_file(tmp_path):
    with pytest.raises(ImageLoadError, match="nope.png: file not found"):
        load_image(tmp_path / "nope.png")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty.png: file is empty"):
        load_image(path)


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is text")
    with pytest.raises(ImageLoadError, match="notes.png: not an image"):
        load_image(path)


def test_truncated_image(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(good)
    data = good.read_bytes()
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="cut.png: corrupt"):
        load_image(path)


def test_too_small(tmp_path):
    path = tmp_path / "tiny.png"
    Image.new("RGB", (8, 100)).save(path)
    with pytest.raises(ImageLoadError, match="tiny.png: 8x100 is too small"):
        load_image(path)


def test_resize_crop_and_tensor_range(tmp_path):
    path = write_sample_images(tmp_path, ["cat"])[0]
    x = load_image_tensor(path, 128)
    assert x.shape == (3, 128, 128) and x.min() >= -1 and x.max() <= 1
    assert resize_and_crop(sample_photo("astronaut"), 96, center=False).size == (96, 96)


def test_list_images_and_atomic_save(tmp_path):
    save_image_atomic(Image.new("RGB", (40, 40)), tmp_path / "b.png")
    save_image_atomic(Image.new("RGB", (40, 40)), tmp_path / "a.png")
    (tmp_path / "caption.txt").write_text("x")
    assert [p.name for p in list_images(tmp_path)] == ["a.png", "b.png"]
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ImageLoadError, match="not found or not a folder"):
        list_images(tmp_path / "missing")
