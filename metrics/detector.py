"""A classical detector for the toy world (`data.scenes`): background, objects, and the personal subject.

It reads an RGB image and returns what the scene renderer would have drawn, using the renderer's
own palette (`OBJECT_COLORS`, `BACKGROUND_COLORS`), shapes (`SHAPES`, drawn by `scenes.coverage`)
and subject (`SUBJECT`), so every change of the world flows through. Steps:

Images smaller than `WORK_RESOLUTION` are analyzed bilinearly upsampled (the renderer's shapes are a few
pixels wide at 32 px; interpolation puts the 50% coverage contour between pixel centers), and the
masks, boxes and pixel counts are given back at the image's size.

1. background: the median color of the image border, named by the nearest background color;
2. foreground: a pixel ``p`` is foreground when it is nearer to some object color than to the
   measured background color, ``min_c |p - c| < |p - bg|`` (for an anti-aliased edge pixel
   ``p = bg + a (c - bg)`` this is the renderer's own mask rule ``a >= 0.5``); holes are filled
   (the seam between the subject's two colors can look like background);
3. objects: connected foreground components larger than a speck (`SPECK`); a component holding solid
   regions of several colors (touching objects) is split between them, unless it is the subject;
4. color: the nearest object color to the median color of the object's inner pixels, ``None``
   beyond `COLOR_TOLERANCE`;
5. shape: each shape's template is rendered by the renderer centered on the object's box, sized to
   fit the box or the object's area, and blurred by each of `BLUR_LEVELS` (a generated image is
   soft: blur rounds a star's tips, shrinking its box, and fills its notches); the shape is the
   template with the highest mask IoU (`shape_iou`);
6. subject score: the subject's template fitted the same way; the score is
   ``min(ring agreement, inner agreement)``, the fractions of its outer-ring and inner-part pixels
   whose nearest color is the subject's color and inner color. A plain disc of either color scores
   0, the rendered subject ~1; `SUBJECT_THRESHOLD` (0.5) calls it the subject.

Tolerances are in 8-bit RGB units (Euclidean). The palette's closest pair of colors is 130 apart,
so colors within 65 of a palette color are unambiguous; `COLOR_TOLERANCE` (100) accepts the
off-color objects a generator draws and rejects colors that belong to none.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from dreamsteer.data.scenes import BACKGROUND_COLORS, MIN_SIZE, OBJECT_COLORS, SHAPES, SUBJECT, SceneObject, coverage, mask_box, parse_caption

COLOR_TOLERANCE = 100.0  # an object's median color farther than this from every object color has no color name
WORK_RESOLUTION = 64  # smaller images are analyzed bilinearly upsampled to at least this size
SPECK = 1 / 3  # components smaller than this fraction of the smallest object the renderer draws are specks
SUBJECT_THRESHOLD = 0.5
BLUR_LEVELS = (0.0, 0.6, 1.2)  # Gaussian sigmas (pixels) of the shape templates: generated images are soft
BORDER = 1  # pixels of the image border that measure the background

_OBJECT_NAMES = list(OBJECT_COLORS)
_OBJECT_RGB = np.array([OBJECT_COLORS[n] for n in _OBJECT_NAMES], dtype=np.float32)
_BACKGROUND_NAMES = list(BACKGROUND_COLORS)
_BACKGROUND_RGB = np.array([BACKGROUND_COLORS[n] for n in _BACKGROUND_NAMES], dtype=np.float32)
_CROSS = ndimage.generate_binary_structure(2, 1)


@dataclass
class DetectedObject:
    """One object: its color name (None when no object color is within `COLOR_TOLERANCE`), shape
    name, box (x0, y0, x1, y1 pixels, x1 / y1 exclusive, as `Scene.boxes`), mask [H, W] bool, pixel
    count, the IoU of its shape's template, the distance of its color from the named color, and its
    subject score (module docstring); `inner_color` is set when it is the subject."""

    color: str | None
    shape: str
    box: tuple[int, int, int, int]
    mask: np.ndarray = field(repr=False)
    pixels: int
    shape_iou: float
    color_distance: float
    subject_score: float
    inner_color: str | None = None

    @property
    def is_subject(self) -> bool:
        return self.subject_score >= SUBJECT_THRESHOLD


@dataclass
class Detection:
    """Everything read from one image; `subject_score` is the best object's (0 without objects)."""

    background: str
    background_rgb: tuple[float, float, float]
    background_distance: float
    objects: list[DetectedObject]

    @property
    def subject_score(self) -> float:
        return max((o.subject_score for o in self.objects), default=0.0)

    @property
    def has_subject(self) -> bool:
        return self.subject_score >= SUBJECT_THRESHOLD


# ----------------------------------------------------------------------------- input
def image_array(image: Image.Image | np.ndarray | torch.Tensor) -> np.ndarray:
    """An RGB image as float32 [H, W, 3] in 8-bit units. Accepts a PIL image, a uint8 array
    [H, W, 3], or a float tensor [3, H, W] / [1, 3, H, W] in [-1, 1] (the project's convention)."""
    if isinstance(image, Image.Image):
        array = np.asarray(image.convert("RGB"), dtype=np.float32)
    elif isinstance(image, torch.Tensor):
        tensor = image.detach().float().cpu()
        if tensor.dim() == 4 and tensor.shape[0] == 1:
            tensor = tensor[0]
        if tensor.dim() != 3 or tensor.shape[0] != 3:
            raise ValueError(f"image tensor of shape {tuple(image.shape)}: expected [3, H, W] or [1, 3, H, W] in [-1, 1]")
        array = ((tensor.clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).numpy()
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image array of dtype {image.dtype} and shape {image.shape}: expected uint8 [H, W, 3]")
        array = image.astype(np.float32)
    else:
        raise TypeError(f"image of type {type(image).__name__}: expected a PIL image, a uint8 array or a tensor")
    if array.shape[0] != array.shape[1]:
        raise ValueError(f"image of size {array.shape[1]}x{array.shape[0]}: toy-world images are square")
    return array


# ----------------------------------------------------------------------------- templates
@lru_cache(maxsize=None)
def _unit_geometry(shape: str) -> tuple[float, float, float]:
    """Half width, half height and area of a shape's box / mask, in units of its size (and size squared)."""
    size, resolution = 0.4, 256
    mask = coverage(SceneObject(shape, _OBJECT_NAMES[0], (0.5, 0.5), size), resolution) >= 0.5
    box = mask_box(mask)
    scale = size * resolution
    return (box[2] - box[0]) / (2 * scale), (box[3] - box[1]) / (2 * scale), float(mask.sum()) / scale**2


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def fitted_object(shape: str, box: Sequence[int], resolution: int, pixels: int | None = None, inner_color: str | None = None) -> SceneObject:
    """The object of `shape` centered on `box` (the renderer centers shapes on their box), sized so
    its box fits `box`, or, given `pixels`, so its area is `pixels`."""
    x0, y0, x1, y1 = box
    hx, hy, area = _unit_geometry(shape)
    if pixels is None:
        size = ((x1 - x0) / (2 * hx) + (y1 - y0) / (2 * hy)) / 2 / resolution
    else:
        size = float(np.sqrt(pixels / area)) / resolution
    center = ((x0 + x1) / 2 / resolution, (y0 + y1) / 2 / resolution)
    return SceneObject(shape, SUBJECT.color if inner_color else _OBJECT_NAMES[0], center, max(size, 1e-3), inner_color)


def _window(box: Sequence[int]) -> tuple[int, int, int]:
    """A square window (x0, y0, side) around `box` with room for every template fitted to it."""
    side = int(1.5 * max(box[2] - box[0], box[3] - box[1])) + 8
    return (box[0] + box[2] - side) // 2, (box[1] + box[3] - side) // 2, side


def _crop(array: np.ndarray, window: tuple[int, int, int]) -> np.ndarray:
    """`array`'s pixels inside the window, zero where the window leaves the image."""
    x0, y0, side = window
    out = np.zeros((side, side) + array.shape[2:], array.dtype)
    ys = slice(max(y0, 0), min(y0 + side, array.shape[0]))
    xs = slice(max(x0, 0), min(x0 + side, array.shape[1]))
    out[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0] = array[ys, xs]
    return out


def _template(obj: SceneObject, window: tuple[int, int, int], resolution: int, inner: bool = False) -> np.ndarray:
    """The renderer's coverage of `obj` (placed in a `resolution` image) inside the window only."""
    x0, y0, side = window
    local = SceneObject(obj.shape, obj.color, ((obj.center[0] * resolution - x0) / side, (obj.center[1] * resolution - y0) / side),
                        obj.size * resolution / side, obj.inner_color)
    return coverage(local, side, inner)


def classify_shape(mask: np.ndarray) -> tuple[str, float]:
    """The shape whose template overlaps the mask best; returns (shape, that IoU). Templates are the
    shape centered on the mask's box, sized to fit the box or the mask's area (blur shrinks a star's
    box, not its area), and blurred by each of `BLUR_LEVELS`."""
    box, resolution, pixels = mask_box(mask), mask.shape[0], int(mask.sum())
    window = _window(box)
    local = _crop(mask, window)
    ious = {}
    for shape in SHAPES:
        ious[shape] = 0.0
        for fit in (None, pixels):
            cover = _template(fitted_object(shape, box, resolution, fit), window, resolution)
            for sigma in BLUR_LEVELS:
                ious[shape] = max(ious[shape], _iou(local, (ndimage.gaussian_filter(cover, sigma) if sigma else cover) >= 0.5))
    best = max(ious, key=ious.get)
    return best, ious[best]


def subject_score(labels: np.ndarray, foreground: np.ndarray, box: Sequence[int]) -> float:
    """``min(ring agreement, inner agreement)`` of the subject template fitted to `box` (module docstring).
    `labels` [H, W] index the object colors (nearest per pixel); `foreground` is the foreground mask."""
    resolution = labels.shape[0]
    obj = fitted_object(SUBJECT.shape, box, resolution, inner_color=SUBJECT.inner_color)
    window = _window(box)
    outer = _template(obj, window, resolution) >= 0.5
    inner = _template(obj, window, resolution, inner=True) >= 0.5
    ring = outer & ~inner
    if not ring.any() or not inner.any():
        return 0.0
    labels, foreground = _crop(labels, window), _crop(foreground, window)
    is_outer = foreground & (labels == _OBJECT_NAMES.index(SUBJECT.color))
    is_inner = foreground & (labels == _OBJECT_NAMES.index(SUBJECT.inner_color))
    return float(min(is_outer[ring].mean(), is_inner[inner].mean()))


# ----------------------------------------------------------------------------- detection
def _nearest(colors: np.ndarray, palette: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of the nearest palette color and the distance to it, per color (last axis RGB)."""
    distances = np.linalg.norm(colors[..., None, :] - palette, axis=-1)
    return distances.argmin(-1), distances.min(-1)


def _split_by_color(component: np.ndarray, labels: np.ndarray, min_pixels: int) -> list[np.ndarray]:
    """The component as one mask, or split between its solid single-color regions (touching objects):
    regions of one color that survive an opening and hold `min_pixels`; every other pixel of the
    component joins the nearest region."""
    seeds = np.zeros(component.shape, dtype=np.int32)
    count = 0
    for index in np.unique(labels[component]):
        solid = ndimage.binary_opening(component & (labels == index), structure=_CROSS)
        regions, n = ndimage.label(solid, structure=_CROSS)
        for r in range(1, n + 1):
            if (regions == r).sum() >= min_pixels:
                count += 1
                seeds[regions == r] = count
    if count < 2:
        return [component]
    _, (iy, ix) = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
    owner = seeds[iy, ix]
    return [component & (owner == k) for k in range(1, count + 1)]


def _describe(mask: np.ndarray, image: np.ndarray, labels: np.ndarray, score: float, factor: int) -> DetectedObject:
    """An object from its mask on the analyzed image (`factor` times the input's size); `score` is its
    subject score. The subject is named by its outer color, measured on the pixels of that color (its
    median color mixes its two parts). Mask, box and pixel count are given at the input's size."""
    is_subject = score >= SUBJECT_THRESHOLD
    core = ndimage.binary_erosion(mask, structure=_CROSS)
    region = core if core.sum() >= 4 else mask
    if is_subject:
        index = _OBJECT_NAMES.index(SUBJECT.color)
        outer = region & (labels == index)
        distance = float(np.linalg.norm(np.median(image[outer], axis=0) - _OBJECT_RGB[index])) if outer.any() else np.inf
    else:
        index, distance = _nearest(np.median(image[region], axis=0), _OBJECT_RGB)
    color = _OBJECT_NAMES[int(index)] if distance <= COLOR_TOLERANCE else None
    shape, shape_iou = classify_shape(mask)
    size = mask.shape[0] // factor
    small = mask.reshape(size, factor, size, factor).mean(axis=(1, 3)) >= 0.5
    x0, y0, x1, y1 = mask_box(mask)
    box = tuple(int(v) for v in mask_box(small)) if small.any() else (x0 // factor, y0 // factor, -(-x1 // factor), -(-y1 // factor))
    return DetectedObject(color, shape, box, small, int(small.sum()), shape_iou, float(distance), score,
                          SUBJECT.inner_color if is_subject else None)


def _upsampled(array: np.ndarray, factor: int) -> np.ndarray:
    """Bilinear upsampling by an integer factor (pixel centers aligned, as the renderer's grid)."""
    if factor == 1:
        return array
    tensor = torch.from_numpy(array).permute(2, 0, 1)[None]
    return torch.nn.functional.interpolate(tensor, scale_factor=factor, mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()


def _min_pixels(resolution: int) -> int:
    """`SPECK` of the smallest object the renderer draws at `resolution` (its smallest shape at MIN_SIZE)."""
    return max(1, int(SPECK * min(_unit_geometry(s)[2] for s in SHAPES) * (MIN_SIZE * resolution) ** 2))


def detect(image: Image.Image | np.ndarray | torch.Tensor) -> Detection:
    """Read the background, the objects and the subject of a toy-world image (module docstring).
    Masks, boxes and pixel counts are at the image's resolution."""
    array = image_array(image)
    border = np.concatenate([array[:BORDER].reshape(-1, 3), array[-BORDER:].reshape(-1, 3),
                             array[:, :BORDER].reshape(-1, 3), array[:, -BORDER:].reshape(-1, 3)])
    background_rgb = np.median(border, axis=0)
    bg_index, bg_distance = _nearest(background_rgb, _BACKGROUND_RGB)

    factor = -(-WORK_RESOLUTION // array.shape[0])
    work = _upsampled(array, factor)
    min_pixels = _min_pixels(work.shape[0])
    labels, object_distance = _nearest(work, _OBJECT_RGB)
    foreground = ndimage.binary_fill_holes(object_distance < np.linalg.norm(work - background_rgb, axis=-1))
    components, n = ndimage.label(foreground, structure=_CROSS)

    objects = []
    for k in range(1, n + 1):
        component = components == k
        if component.sum() < min_pixels:
            continue
        score = subject_score(labels, foreground, mask_box(component))
        parts = [component] if score >= SUBJECT_THRESHOLD else _split_by_color(component, labels, min_pixels)
        for part in parts:
            if part.sum() >= min_pixels:
                part_score = score if part is component else subject_score(labels, foreground, mask_box(part))
                objects.append(_describe(part, work, labels, part_score, factor))
    objects.sort(key=lambda o: (o.box[0], o.box[1]))
    return Detection(_BACKGROUND_NAMES[int(bg_index)], tuple(float(v) for v in background_rgb), float(bg_distance), objects)


# ----------------------------------------------------------------------------- matching
def match_masks(detected: Sequence[np.ndarray], truth: Sequence[np.ndarray]) -> list[tuple[int, int, float]]:
    """One-to-one matching of detected and true masks maximizing the total mask IoU (Hungarian):
    ``[(detected index, truth index, IoU)]`` for the pairs that overlap at all."""
    if not len(detected) or not len(truth):
        return []
    iou = np.array([[_iou(d, t) for t in truth] for d in detected])
    rows, cols = linear_sum_assignment(-iou)
    return [(int(r), int(c), float(iou[r, c])) for r, c in zip(rows, cols) if iou[r, c] > 0]


def objects_at(detection: Detection, masks: Sequence[np.ndarray], min_iou: float = 0.5) -> list[DetectedObject | None]:
    """For each of `masks` (a scene's truth), the detected object matched to it (`match_masks`) with mask
    IoU >= `min_iou`, else None: what the image shows at each object's place."""
    found: list[DetectedObject | None] = [None] * len(masks)
    for d, t, iou in match_masks([o.mask for o in detection.objects], masks):
        if iou >= min_iou:
            found[t] = detection.objects[d]
    return found


def outside_change(source: Image.Image | np.ndarray | torch.Tensor, edited: Image.Image | np.ndarray | torch.Tensor,
                   mask: np.ndarray, margin: int = 2) -> float:
    """Mean absolute difference (8-bit RGB, over pixels and channels) between two images outside `mask`
    dilated by `margin` pixels: how much an edit of the masked object changed the rest."""
    keep = ~ndimage.binary_dilation(mask, iterations=margin) if margin else ~mask
    return float(np.abs(image_array(edited) - image_array(source))[keep].mean())


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two boxes (x0, y0, x1, y1)."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def in_box(detection: Detection, color: str, shape: str, box: Sequence[float], min_iou: float = 0.5) -> bool:
    """Whether an object of `color` and `shape` is detected with box IoU >= `min_iou` with `box` (pixels):
    the rule of grounding (a phrase's object in its box), for the gligen floor and ReGround's table."""
    return max((box_iou(o.box, box) for o in detection.objects if (o.color, o.shape) == (color, shape)), default=0.0) >= min_iou


def caption_agreement(detection: Detection, caption: str) -> dict[str, Any]:
    """How a detection agrees with a grammar caption. Caption objects and detected objects are paired
    one to one maximizing the number of agreeing colors plus shapes (Hungarian); an unpaired caption
    object agrees in nothing. Returns ``background`` (bool), ``colors`` / ``shapes`` (one bool per
    caption object), ``count`` (as many objects as the caption names) and ``exact`` (all of these)."""
    background, wanted = parse_caption(caption)
    colors, shapes = [False] * len(wanted), [False] * len(wanted)
    if wanted and detection.objects:
        score = np.array([[(o.color == c) + (o.shape == s) for o in detection.objects] for c, s in wanted], dtype=float)
        for r, k in zip(*linear_sum_assignment(-score)):
            colors[r] = detection.objects[k].color == wanted[r][0]
            shapes[r] = detection.objects[k].shape == wanted[r][1]
    agree = {"background": detection.background == background, "colors": colors, "shapes": shapes,
             "count": len(detection.objects) == len(wanted)}
    agree["exact"] = agree["background"] and agree["count"] and all(colors) and all(shapes)
    return agree


def caption_rates(agreements: Sequence[dict[str, Any]]) -> dict[str, tuple[float, int]]:
    """The text-to-image floor's rates over `caption_agreement` results, each as (rate, n): ``background`` over
    captions, ``color`` and ``shape`` over caption objects, ``count`` over two-object captions (nan when n is 0)."""
    groups = {
        "background": [a["background"] for a in agreements],
        "color": [c for a in agreements for c in a["colors"]],
        "shape": [s for a in agreements for s in a["shapes"]],
        "count": [a["count"] for a in agreements if len(a["colors"]) == 2],
    }
    return {name: (float(np.mean(flags)) if flags else float("nan"), len(flags)) for name, flags in groups.items()}


def summary(detection: Detection) -> dict[str, Any]:
    """A JSON-ready description of a detection (no masks)."""
    return {
        "background": detection.background,
        "subject_score": round(detection.subject_score, 3),
        "objects": [{"color": o.color, "shape": o.shape, "box": list(o.box), "pixels": o.pixels, "shape_iou": round(o.shape_iou, 3),
                     "color_distance": round(o.color_distance, 1), "subject_score": round(o.subject_score, 3)} for o in detection.objects],
    }
