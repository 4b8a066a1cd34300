"""The toy world: procedural captioned scenes with their ground truth, and a personal subject.

A scene is a flat background color with 1-3 non-overlapping flat-colored shapes on it, captioned
by a fixed grammar::

    a red circle and a blue square on a white background

Every scene carries its truth (background, per-object shape / color / center / size, masks, boxes),
so a detector can score generated images against the caption. Shapes are rendered anti-aliased:
coverage is computed on a grid `SUPERSAMPLE` times finer than the image and averaged, and each
object's mask is the set of pixels it covers at least half.

The personal subject (`SUBJECT`) is outside the pretraining distribution: a two-tone object (a disc
with a differently colored inner disc). Pretraining scenes hold one-color objects, and optionally
(`two_tone_p`) two-tone ones captioned "a red circle with a yellow center", but never the subject
(`TWO_TONE_LEAVE_OUT`: never its pair of colors on any shape, never its shape in that pair, or never its
shape two-tone at all), so a base model asked for "a sks circle" draws a plain circle; a personalized one
draws the subject.

Everything is deterministic from a seed (`numpy.random.Generator`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

RESOLUTION = 32  # the toy model's image size in pixels
SUPERSAMPLE = 4  # anti-aliasing: coverage is measured on a 4x finer grid

# Colors are far apart in RGB (>= 115 between any two) so a nearest-color rule
# classifies them even on imperfect generated images. The two sets are disjoint: an object is never
# the color of a background.
OBJECT_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (245, 215, 30),
    "purple": (160, 30, 210),
}
BACKGROUND_COLORS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "cyan": (70, 200, 220),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")

# Object size: the radius of the circle an object is drawn in, as a fraction of the image side.
MIN_SIZE, MAX_SIZE = 0.14, 0.22
GAP = 0.03  # the least distance between two objects' circles (fraction of the image side)
MIN_OBJECTS, MAX_OBJECTS = 1, 2  # the pretraining distribution (the renderer draws up to 3)

# The caption grammar: "a <color> <shape>" items joined by ", " and " and ", then the background.
ARTICLE = "a"
BACKGROUND_SUFFIX = "background"
GRAMMAR_WORDS: tuple[str, ...] = (ARTICLE, "and", "on", BACKGROUND_SUFFIX, *OBJECT_COLORS, *BACKGROUND_COLORS, *SHAPES)
# Optional position words after an object ("a red circle top left and ..."): the third of the image its
# center lies in, vertically and horizontally; "middle" for the centre third. Off in the shipped world,
# whose captions never say where an object is (a model needs no position code to follow them).
POSITION_WORDS: tuple[str, ...] = ("top", "bottom", "left", "right", "middle")
# Optional fixed pattern: a faint texture that is the same in every image, like a camera sensor's
# fixed-pattern noise. Off in the shipped world, which looks the same under any shift of its objects, so
# that a denoiser of it never needs to know where a pixel is (and GLIGEN's gated layers, which have no
# position embedding of their own, find little position to read at 8x8: docs/toy_experiments.md). With the pattern on,
# predicting it from a noisy latent takes knowing where each latent pixel is.
FIXED_PATTERN_SEED = 7919
FIXED_PATTERN_CELL = 2  # default pixels per cell of the pattern: one latent pixel of the toy VAE (4: one 8x8 attention token)
# The strongest pattern allowed: at +-32 per channel a pixel moves <= 56 in RGB, under half the least
# distance between palette colors (115), so every pixel stays nearest its own color for the detector.
FIXED_PATTERN_MAX = 32.0


@dataclass(frozen=True)
class SubjectSpec:
    """The personal subject: a `shape` in `color` with a same-shaped inner part of `inner_ratio`
    times its size in `inner_color`; prompts name it "<token> <class_word>"."""

    shape: str
    color: str
    inner_color: str
    inner_ratio: float
    class_word: str
    token: str


SUBJECT = SubjectSpec(shape="circle", color="blue", inner_color="yellow", inner_ratio=0.5, class_word="circle", token="sks")
# How two-tone objects keep the subject out (`sample_objects`): not at all, its colors on no shape, not on its
# shape, or no two-tone object of its shape.
TWO_TONE_LEAVE_OUT = ("nothing", "subject_colors", "subject", "subject_shape")


@dataclass(frozen=True)
class SceneObject:
    """One object: its shape, color, center (x, y as fractions of the image side) and size (the
    radius of its bounding circle as a fraction of the side). `inner_color` marks a two-tone object
    (the personal subject): its inner part of `SUBJECT.inner_ratio` times the size has that color."""

    shape: str
    color: str
    center: tuple[float, float]
    size: float
    inner_color: Optional[str] = None

    @property
    def is_subject(self) -> bool:
        """Whether this is the personal subject."""
        return (self.shape, self.color, self.inner_color) == (SUBJECT.shape, SUBJECT.color, SUBJECT.inner_color)

    @property
    def phrase(self) -> str:
        """How captions name this object: "red circle", "red circle with a yellow center" (a
        two-tone object), or "sks circle" for the subject."""
        if self.is_subject:
            return f"{SUBJECT.token} {SUBJECT.class_word}"
        if self.inner_color is not None:
            return f"{self.color} {self.shape} with {ARTICLE} {self.inner_color} center"
        return f"{self.color} {self.shape}"


@dataclass
class Scene:
    """A rendered scene and its truth. `masks` [N, H, W] bool (pixels an object covers at least
    half), `boxes` [N, 4] int pixel boxes (x0, y0, x1, y1) of the masks, x1 / y1 exclusive."""

    image: Image.Image
    background: str
    objects: list[SceneObject]
    masks: np.ndarray
    boxes: np.ndarray
    caption: str = field(default="")

    @property
    def phrases(self) -> list[str]:
        return [o.phrase for o in self.objects]


# ----------------------------------------------------------------------------- captions
def position_phrase(center: tuple[float, float]) -> str:
    """Where a center (x, y as fractions of the side, y down) lies by thirds: "top left", "right", "middle"."""
    x, y = center
    vertical = "top" if y < 1 / 3 else "bottom" if y > 2 / 3 else ""
    horizontal = "left" if x < 1 / 3 else "right" if x > 2 / 3 else ""
    return " ".join(w for w in (vertical, horizontal) if w) or "middle"


def make_caption(background: str, objects: Sequence[SceneObject], positions: bool = False) -> str:
    """The grammar's caption: "a red circle and a blue square on a white background"; with `positions`
    each object's `position_phrase` follows it: "a red circle top left and a blue square right on ..."."""
    items = [f"{ARTICLE} {o.phrase}" + (f" {position_phrase(o.center)}" if positions else "") for o in objects]
    listed = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    return f"{listed} on {ARTICLE} {background} {BACKGROUND_SUFFIX}"


def longest_caption(max_objects: int, two_tone: bool = False, positions: bool = False) -> str:
    """A caption of the most words scenes of up to `max_objects` objects can get: every object two-tone
    if `two_tone`, every place two words ("top left") if `positions`. Checked against a tokenizer's
    length before training, since a longer caption would lose its background to truncation."""
    color, inner = list(OBJECT_COLORS)[:2]
    objects = [SceneObject(SHAPES[0], color, (0.1, 0.1), 0.1, inner if two_tone else None)] * max_objects
    return make_caption(next(iter(BACKGROUND_COLORS)), objects, positions=positions)


def parse_caption(caption: str) -> tuple[str, list[tuple[str, str]]]:
    """Inverse of `make_caption` for plain objects: (background, [(color, shape), ...]).

    Raises ValueError naming the caption when it is not in the grammar."""
    head, sep, tail = caption.strip().rpartition(" on a ")
    background, _, suffix = tail.partition(" ")
    if not sep or background not in BACKGROUND_COLORS or suffix != BACKGROUND_SUFFIX:
        raise ValueError(f"caption {caption!r}: does not end with 'on a <{'|'.join(BACKGROUND_COLORS)}> background'")
    parts = [p for chunk in head.split(" and ") for p in chunk.split(", ")]
    objects = []
    for part in parts:
        words = part.split()
        if len(words) != 3 or words[0] != ARTICLE or words[1] not in OBJECT_COLORS or words[2] not in SHAPES:
            raise ValueError(f"caption {caption!r}: {part!r} is not 'a <color> <shape>'")
        objects.append((words[1], words[2]))
    return background, objects


# ----------------------------------------------------------------------------- geometry
def _polygon(shape: str) -> np.ndarray | None:
    """Vertices [K, 2] of a shape in units of its size, centered on its bounding box (None: circle)."""
    if shape == "circle":
        return None
    if shape == "square":
        s = 0.8
        return np.array([[-s, -s], [s, -s], [s, s], [-s, s]])
    if shape == "triangle":  # equilateral, pointing up
        angles = np.deg2rad([-90, 30, 150])
        points = 1.15 * np.stack([np.cos(angles), np.sin(angles)], 1)
    elif shape == "star":  # five points, pointing up
        angles = np.deg2rad(-90 + 36 * np.arange(10))
        radii = np.where(np.arange(10) % 2 == 0, 1.1, 0.5)
        points = radii[:, None] * np.stack([np.cos(angles), np.sin(angles)], 1)
    else:
        raise ValueError(f"unknown shape {shape!r}: expected one of {SHAPES}")
    points[:, 1] -= (points[:, 1].min() + points[:, 1].max()) / 2  # center the bounding box
    return points


def _inside(shape: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Whether points (x, y), in units of the object's size relative to its center, are inside."""
    polygon = _polygon(shape)
    if polygon is None:
        return x * x + y * y <= 1.0
    inside = np.zeros(x.shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(polygon, np.roll(polygon, -1, axis=0)):  # even-odd ray casting
        crosses = (y0 > y) != (y1 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (x < x_at)
    return inside


def coverage(obj: SceneObject, resolution: int, inner: bool = False) -> np.ndarray:
    """Fraction [H, W] of each pixel the object (or its inner part) covers, from a supersampled grid."""
    n = resolution * SUPERSAMPLE
    grid = (np.arange(n) + 0.5) / n  # sub-pixel centers as fractions of the side
    scale = obj.size * (SUBJECT.inner_ratio if inner else 1.0)
    x = (grid[None, :] - obj.center[0]) / scale
    y = (grid[:, None] - obj.center[1]) / scale
    x, y = np.broadcast_arrays(x, y)
    hits = _inside(obj.shape, x, y).astype(np.float32)
    return hits.reshape(resolution, SUPERSAMPLE, resolution, SUPERSAMPLE).mean(axis=(1, 3))


@functools.lru_cache(maxsize=8)
def fixed_pattern(resolution: int, amplitude: float, cell: int = FIXED_PATTERN_CELL) -> np.ndarray:
    """The fixed pattern at `resolution`: [H, W, 3] float offsets in 8-bit levels, one value per
    channel and `cell` x `cell` pixels, uniform in [-amplitude, amplitude], drawn from
    FIXED_PATTERN_SEED (so every image of a resolution gets the same one). Drawn once per
    (resolution, amplitude, cell), as the renderer asks for it for every scene; the array is read-only."""
    if cell < 1:
        raise ValueError(f"fixed pattern cell {cell}: must be >= 1 pixel")
    cells = -(-resolution // cell)
    grid = np.random.default_rng(FIXED_PATTERN_SEED).uniform(-1.0, 1.0, size=(cells, cells, 3)).astype(np.float32) * amplitude
    pattern = grid.repeat(cell, axis=0).repeat(cell, axis=1)[:resolution, :resolution]
    pattern.setflags(write=False)
    return pattern


def mask_box(mask: np.ndarray) -> np.ndarray:
    """Pixel box (x0, y0, x1, y1) of a boolean mask, x1 / y1 exclusive (zeros for an empty mask)."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return np.zeros(4, dtype=np.int64)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.int64)


# ----------------------------------------------------------------------------- rendering
def render(background: str, objects: Sequence[SceneObject], resolution: int = RESOLUTION, pattern: float = 0.0,
           pattern_cell: int = FIXED_PATTERN_CELL) -> Scene:
    """Draw `objects` (they must not overlap) on a `background`, with masks, boxes and caption; with
    `pattern` > 0 the fixed pattern of that amplitude and cell (`fixed_pattern`) is added over the whole image."""
    if background not in BACKGROUND_COLORS:
        raise ValueError(f"unknown background {background!r}: expected one of {list(BACKGROUND_COLORS)}")
    if not objects:
        raise ValueError("a scene needs at least one object")
    image = np.empty((resolution, resolution, 3), dtype=np.float32)
    image[:] = BACKGROUND_COLORS[background]
    masks = []
    for obj in objects:
        if obj.color not in OBJECT_COLORS or (obj.inner_color is not None and obj.inner_color not in OBJECT_COLORS):
            raise ValueError(f"object {obj}: colors must be among {list(OBJECT_COLORS)}")
        cover = coverage(obj, resolution)[..., None]
        image = image * (1 - cover) + np.array(OBJECT_COLORS[obj.color], np.float32) * cover
        if obj.inner_color is not None:
            inner = coverage(obj, resolution, inner=True)[..., None]
            image = image * (1 - inner) + np.array(OBJECT_COLORS[obj.inner_color], np.float32) * inner
        masks.append(cover[..., 0] >= 0.5)
    masks_array = np.stack(masks)
    boxes = np.stack([mask_box(m) for m in masks_array])
    if pattern:
        image = image + fixed_pattern(resolution, pattern, pattern_cell)
    pil = Image.fromarray(np.clip(image + 0.5, 0, 255).astype(np.uint8))
    return Scene(pil, background, list(objects), masks_array, boxes, make_caption(background, objects))


def _place(rng: np.random.Generator, sizes: Sequence[float], tries: int = 100) -> list[tuple[float, float]] | None:
    """Centers for objects of `sizes`, inside the image and apart by at least GAP (None: no room)."""
    centers: list[tuple[float, float]] = []
    for size in sizes:
        for _ in range(tries):
            c = tuple(rng.uniform(size + 0.02, 1 - size - 0.02, size=2))
            if all(np.hypot(c[0] - o[0], c[1] - o[1]) >= size + s + GAP for o, s in zip(centers, sizes)):
                centers.append(c)
                break
        else:
            return None
    return centers


def sample_objects(rng: np.random.Generator, count: int, subject: bool = False, two_tone_p: float = 0.0,
                   leave_out: str = "nothing") -> list[SceneObject]:
    """`count` random non-overlapping objects; with `subject`, the first one is the personal subject;
    with `two_tone_p` > 0 each other object is two-tone (a random other inner color) with that probability.
    `leave_out` (`TWO_TONE_LEAVE_OUT`) keeps the subject out of the two-tone objects: "subject_colors"
    never gives one the subject's pair of colors (its outer color around its inner color) on any shape,
    "subject" never on the subject's shape (a blue square with a yellow center is drawn, the subject is
    not), "subject_shape" draws every object of the subject's shape in one color (its shape is never seen
    with a center, so no color is learned as a circle's center), "nothing" draws every pair (the VAE's
    world: it must reconstruct the subject)."""
    if leave_out not in TWO_TONE_LEAVE_OUT:
        raise ValueError(f"leave_out must be one of {TWO_TONE_LEAVE_OUT}, got {leave_out!r}")
    while True:
        sizes = list(rng.uniform(MIN_SIZE, MAX_SIZE, size=count))
        centers = _place(rng, sizes)
        if centers is not None:
            break
    objects = []
    for i, (center, size) in enumerate(zip(centers, sizes)):
        if subject and i == 0:
            objects.append(SceneObject(SUBJECT.shape, SUBJECT.color, center, size, SUBJECT.inner_color))
        else:
            shape, color = str(rng.choice(SHAPES)), str(rng.choice(list(OBJECT_COLORS)))
            inner = None
            if two_tone_p and rng.random() < two_tone_p and not (leave_out == "subject_shape" and shape == SUBJECT.shape):
                subject_pair = color == SUBJECT.color and (leave_out == "subject_colors" or (leave_out == "subject" and shape == SUBJECT.shape))
                excluded = {color} | ({SUBJECT.inner_color} if subject_pair else set())
                inner = str(rng.choice([c for c in OBJECT_COLORS if c not in excluded]))
            objects.append(SceneObject(shape, color, center, size, inner))
    return objects


def _rng(seed: int | Sequence[int] | np.random.Generator) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def random_scene(
    seed: int | Sequence[int] | np.random.Generator,
    min_objects: int = MIN_OBJECTS,
    max_objects: int = MAX_OBJECTS,
    resolution: int = RESOLUTION,
    two_tone_p: float = 0.0,
    position_words_p: float = 0.0,
    pattern: float = 0.0,
    pattern_cell: int = FIXED_PATTERN_CELL,
    leave_out: str = "nothing",
) -> Scene:
    """A random scene of the pretraining distribution (uniform background, count, shapes, colors).
    `two_tone_p` > 0 makes objects two-tone with that probability; `leave_out` keeps the subject out of
    them (`sample_objects`), as the diffusion stages do. With probability
    `position_words_p` the caption names each object's place (`make_caption(..., positions=True)`);
    that draw comes last, so the scene itself is the same for every `position_words_p`. `pattern` adds
    the fixed pattern of that amplitude and cell (`render`); it draws nothing from the seed."""
    if not 1 <= min_objects <= max_objects <= 3:
        raise ValueError(f"object counts must satisfy 1 <= min_objects <= max_objects <= 3, got {min_objects}, {max_objects}")
    rng = _rng(seed)
    background = str(rng.choice(list(BACKGROUND_COLORS)))
    count = int(rng.integers(min_objects, max_objects + 1))
    scene = render(background, sample_objects(rng, count, two_tone_p=two_tone_p, leave_out=leave_out), resolution, pattern, pattern_cell)
    if position_words_p and rng.random() < position_words_p:
        scene.caption = make_caption(background, scene.objects, positions=True)
    return scene


def subject_scene(seed: int | Sequence[int] | np.random.Generator, token: str | None = None, resolution: int = RESOLUTION) -> Scene:
    """The personal subject alone at a random place and size on a random background; the caption
    names it "<token> <class word>" (default token: SUBJECT.token)."""
    rng = _rng(seed)
    background = str(rng.choice(list(BACKGROUND_COLORS)))
    scene = render(background, sample_objects(rng, 1, subject=True), resolution)
    if token is not None and token != SUBJECT.token:
        scene.caption = scene.caption.replace(f" {SUBJECT.token} ", f" {token} ", 1)
    return scene


def write_subject_photos(directory: str | Path, count: int = 5, seed: int = 0, token: str | None = None, captions: bool = True) -> list[Path]:
    """Write `count` photos of the personal subject (PNG, plus a caption .txt each when `captions`)
    to `directory`; returns the image paths. Files are written atomically."""
    from dreamsteer.data.images import save_image_atomic

    directory = Path(directory)
    paths = []
    for i in range(count):
        scene = subject_scene((seed, i), token)
        path = save_image_atomic(scene.image, directory / f"subject_{i:02d}.png")
        if captions:
            _write_text_atomic(path.with_suffix(".txt"), scene.caption + "\n")
        paths.append(path)
    return paths


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


# ----------------------------------------------------------------------------- torch datasets
class SceneDataset(Dataset):
    """`length` random scenes; item `i` is drawn from the seed ``(seed, first + i)``, so any item is
    reproducible alone (`first` > 0: the scenes after the first ones, for a resumed run). Items:
    ``pixel_values`` [3, H, W] in [-1, 1], ``caption``, ``phrases`` (one per object) and ``boxes`` [N, 4]
    (x0, y0, x1, y1 as fractions of the side)."""

    def __init__(self, length: int, seed: int = 0, resolution: int = RESOLUTION, min_objects: int = MIN_OBJECTS, max_objects: int = MAX_OBJECTS,
                 two_tone_p: float = 0.0, position_words_p: float = 0.0, pattern: float = 0.0, pattern_cell: int = FIXED_PATTERN_CELL,
                 leave_out: str = "nothing", first: int = 0):
        self.length, self.seed, self.resolution, self.first = length, seed, resolution, first
        self.min_objects, self.max_objects, self.two_tone_p = min_objects, max_objects, two_tone_p
        self.position_words_p, self.pattern, self.pattern_cell = position_words_p, pattern, pattern_cell
        self.leave_out = leave_out

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        scene = random_scene((self.seed, self.first + index), self.min_objects, self.max_objects, self.resolution, self.two_tone_p,
                             self.position_words_p, self.pattern, self.pattern_cell, self.leave_out)
        return scene_item(scene)


def scene_item(scene: Scene) -> dict:
    """A scene as a training item (see `SceneDataset`)."""
    from dreamsteer.data.images import pil_to_tensor

    return {
        "pixel_values": pil_to_tensor(scene.image),
        "caption": scene.caption,
        "phrases": scene.phrases,
        "boxes": torch.from_numpy(scene.boxes.astype(np.float32)) / scene.image.size[0],
    }


def collate_scenes(items: Sequence[dict]) -> dict:
    """Stack pixels; keep captions, phrases and boxes as per-item lists (objects vary in number)."""
    return {
        "pixel_values": torch.stack([it["pixel_values"] for it in items]),
        "caption": [it["caption"] for it in items],
        "phrases": [it["phrases"] for it in items],
        "boxes": [it["boxes"] for it in items],
    }

