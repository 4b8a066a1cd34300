"""Subject (instance) and class images for personalization: validation, datasets, class-image generation, DataModule.

The training stream is endless and indexed by a global example counter ``i``: micro-batch ``b``
of rank ``r`` (of ``W``) holds examples ``(b * W + r) * B + j``. With K concepts (``data.concepts``;
K = 1 for the single ``data.instance_dir``), example ``i`` belongs to concept ``c = i mod K`` and is
that concept's example ``j = i // K``: instance image ``order_{c,e}[j mod N_c]`` of epoch
``e = j // N_c`` (a permutation drawn from ``(seed, e, c)``), its crop, flip and prompt template from
a generator seeded with ``(seed, i)``. With aspect-ratio buckets, micro-batch ``i // B`` takes its
B images from one bucket of a plan drawn from ``(seed, epoch)`` (``SubjectDataset._bucket_batch``).
A batch is thus a function of ``(seed, step, rank)`` alone, which makes a resumed run see exactly
the batches an uninterrupted one sees (the DataModule restarts the stream at
``global_step * accumulate_grad_batches``).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from dreamsteer.data.images import IMAGE_SUFFIXES, ImageLoadError, list_images, load_image, pil_to_tensor, save_image_atomic

# Textual Inversion's prompt templates (Gal et al.; diffusers' textual_inversion example).
TEMPLATES = {
    "object": [
        "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
        "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
        "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
        "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
        "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
        "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
        "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
    ],
    "style": [
        "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
        "the painting in the style of {}", "a clean painting in the style of {}", "a dirty painting in the style of {}",
        "a dark painting in the style of {}", "a picture in the style of {}", "a cool painting in the style of {}",
        "a close-up painting in the style of {}", "a bright painting in the style of {}", "a good painting in the style of {}",
        "a rendition in the style of {}", "a nice painting in the style of {}", "a small painting in the style of {}",
        "a weird painting in the style of {}", "a large painting in the style of {}",
    ],
}


class SubjectDataError(ValueError):
    """Personalization data that cannot be used; the message names the config key or file."""


@dataclass
class ConceptConfig:
    """One entry of ``data.concepts``: a subject with its own photos, prompts and token (see docs/personalization.md)."""

    instance_dir: str = "???"
    instance_prompt: str = "???"
    token: Optional[str] = None  # the word that names it; TI / Custom Diffusion: one of the method's tokens
    class_dir: Optional[str] = None  # default with prior preservation: <output_dir>/class_images/concept<k>
    class_prompt: Optional[str] = None
    subject: Optional[str] = None  # fills "{}" of data.prompt_templates; default data.subject
    mask_token: Optional[str] = None  # data.masks=attention; default data.mask_token


@dataclass
class SubjectDataConfig:
    """The ``data`` block of ``conf/personalize.yaml`` (see docs/personalization.md)."""

    instance_dir: str = "???"
    instance_prompt: str = "???"
    concepts: Optional[List[ConceptConfig]] = None  # several subjects in one run, instead of instance_dir / instance_prompt
    captions: bool = True  # <image>.txt next to an image replaces the prompt for that image
    prompt_templates: Any = None  # null | "object" | "style" | list of strings with "{}"
    subject: Optional[str] = None  # what "{}" becomes in the templates, e.g. "<sks> cat"
    class_dir: Optional[str] = None  # default with prior preservation: <output_dir>/class_images
    class_prompt: Optional[str] = None
    num_class_images: int = 100
    class_steps: int = 25
    class_guidance_scale: float = 7.5
    class_batch_size: int = 4
    resolution: Optional[int] = None  # default: the model's resolution
    center_crop: bool = True
    flip_p: float = 0.5
    repeats: int = 1
    shuffle: bool = True
    batch_size: int = 1
    num_workers: int = 0
    masks: Optional[str] = None  # null | files (<image stem>.mask.<ext> beside each image) | attention (computed)
    mask_token: Optional[str] = None  # masks=attention: the word of the instance prompt naming the subject
    mask_threshold: float = 0.3
    mask_dilation: int = 1
    caption_dropout: float = 0.0  # probability that an instance prompt becomes "" (for classifier-free guidance)
    shuffle_captions: bool = False  # shuffle the comma-separated tags of instance prompts ...
    keep_tokens: int = 0  # ... after the first keep_tokens tags
    buckets: bool = False  # aspect-ratio buckets (W, H multiples of bucket_step, W * H <= resolution^2)
    bucket_step: int = 64
    resize_augmentation: bool = False  # Custom Diffusion's random zoom out / in with a valid-region loss mask


@dataclass(frozen=True)
class InstanceItem:
    path: Path
    caption: Optional[str]  # from <image>.txt, else None
    mask: Optional[Path] = None  # loss mask (white: learned, black: ignored), with data.masks


@dataclass(frozen=True)
class Concept:
    """One subject of a run: the single ``data.instance_dir`` form (``key`` "data") or one ``data.concepts[k]``.

    `key` is the config prefix that names it in errors; `items` are filled by `validate_subject_data`,
    `class_paths` by `SubjectDataModule.setup` (prior preservation), with `class_captions` (the
    caption file of each class image, else None: the image's prompt is then `class_prompt`).
    """

    items: Sequence[InstanceItem]
    instance_prompt: str
    class_paths: Sequence[Path] = ()
    class_captions: Sequence[Optional[str]] = ()
    class_prompt: Optional[str] = None
    subject: Optional[str] = None
    token: Optional[str] = None
    key: str = "data"
    instance_dir: Optional[str] = None
    class_dir: Optional[str] = None
    mask_token: Optional[str] = None


MASK_SUFFIX = ".mask"  # <stem>.mask.png is the loss mask of <stem>.<ext>, never an instance image


def mask_path(image: Path) -> Path | None:
    """The mask file beside `image` (``<stem>.mask.<any image suffix>``), or None."""
    found = sorted(p for p in image.parent.glob(f"{image.stem}{MASK_SUFFIX}.*") if p.suffix.lower() in IMAGE_SUFFIXES)
    return found[0] if found else None


def load_mask(path: Path, size: tuple[int, int]) -> Image.Image:
    """A loss mask as 8-bit grey, checked to match its image's `size` and to keep some pixels."""
    mask = load_image(path, min_side=1).convert("L")
    if mask.size != size:
        raise SubjectDataError(f"mask file {path}: {mask.size[0]}x{mask.size[1]} but its image is {size[0]}x{size[1]}")
    if mask.getextrema()[1] == 0:
        raise SubjectDataError(f"mask file {path}: is all black (it would ignore every pixel of its image)")
    return mask


# ----------------------------------------------------------------------------- validation
def resolve_templates(cfg: Any) -> list[str] | None:
    templates = cfg.prompt_templates
    if templates is None:
        return None
    if isinstance(templates, str):
        if templates not in TEMPLATES:
            raise SubjectDataError(f"config key 'data.prompt_templates': {templates!r} is not one of {sorted(TEMPLATES)} or a list of templates")
        return list(TEMPLATES[templates])
    templates = [str(t) for t in templates]
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise SubjectDataError(f"config key 'data.prompt_templates': every template needs exactly one '{{}}', got {bad or templates}")
    return templates


def read_instance_items(instance_dir: str | Path, captions: bool = True, masks: bool = False, key: str = "data.instance_dir") -> list[InstanceItem]:
    """The instance images of a folder with their caption files (and mask files), every image opened once to check it.
    `key` is the folder's config key (``<...>_dir``), which errors name; an empty caption file names its ``<...>_prompt``."""
    directory = Path(instance_dir)
    if not directory.exists():
        raise FileNotFoundError(f"config key '{key}': folder {directory} not found")
    try:
        paths = [p for p in list_images(directory) if not p.stem.endswith(MASK_SUFFIX)]
    except ImageLoadError as err:
        raise SubjectDataError(f"config key '{key}': {err}") from err
    if not paths:
        raise SubjectDataError(f"config key '{key}': folder {directory} holds no images (.png, .jpg, .jpeg, .webp, ...)")
    items = []
    for path in paths:
        image = load_image(path)  # raises ImageLoadError naming the file
        mask = None
        if masks:
            mask = mask_path(path)
            if mask is None:
                raise SubjectDataError(f"config key 'data.masks': image {path} has no mask file {path.stem}{MASK_SUFFIX}.png beside it")
            load_mask(mask, image.size)
        caption = None
        text = path.with_suffix(".txt")
        if captions and text.is_file():
            try:
                caption = text.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as err:
                raise SubjectDataError(f"caption file {text}: cannot be read as UTF-8 text ({err})") from err
            if not caption:
                raise SubjectDataError(f"caption file {text}: is empty (delete it to use {key.removesuffix('dir')}prompt)")
        items.append(InstanceItem(path, caption, mask))
    return items


def aspect_buckets(resolution: int, step: int, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """Bucket sizes (W, H): multiples of `step`, each W with the largest H such that W * H <= resolution^2,
    aspect ratios within [1 / max_ratio, max_ratio], sorted by W (the square R x R is one when step divides R)."""
    sizes = set()
    for w in range(step, 2 * resolution + 1, step):
        h = (resolution * resolution // w) // step * step
        if h >= step and 1 / max_ratio <= w / h <= max_ratio:
            sizes.add((w, h))
    return sorted(sizes)


def nearest_bucket(size: tuple[int, int], buckets: Sequence[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is closest to `size`'s (in log ratio; the first on ties)."""
    ratio = math.log(size[0] / size[1])
    return min(range(len(buckets)), key=lambda k: abs(math.log(buckets[k][0] / buckets[k][1]) - ratio))


def check_resolution(cfg: Any, vae_scale_factor: int | None, model_resolution: int | None = None) -> int | None:
    """``data.resolution`` (default: the model's) and ``data.bucket_step`` checked against the VAE factor; returns the resolution."""
    resolution = cfg.resolution or model_resolution
    if resolution is not None:
        if resolution < 8:
            raise SubjectDataError(f"config key 'data.resolution': {resolution} is too small")
        if vae_scale_factor and resolution % vae_scale_factor:
            raise SubjectDataError(
                f"config key 'data.resolution': {resolution} is not a multiple of the VAE factor {vae_scale_factor} "
                f"(try {max(vae_scale_factor, round(resolution / vae_scale_factor) * vae_scale_factor)})"
            )
        if cfg.buckets and (cfg.bucket_step < 1 or cfg.bucket_step > resolution or (vae_scale_factor and cfg.bucket_step % vae_scale_factor)):
            raise SubjectDataError(
                f"config key 'data.bucket_step': {cfg.bucket_step} must be a multiple of the VAE factor {vae_scale_factor} "
                f"and at most data.resolution {resolution} (SD: 64, so every latent side divides by 8)"
            )
        if cfg.get("resize_augmentation") and vae_scale_factor:
            sizes = aspect_buckets(resolution, cfg.bucket_step) if cfg.buckets else [(resolution, resolution)]
            shortest = min(min(size) for size in sizes)
            if shortest < 3 * vae_scale_factor:
                raise SubjectDataError(
                    f"config key 'data.resize_augmentation': needs image sides of at least 3 latent pixels "
                    f"({3 * vae_scale_factor} px), the smallest here is {shortest} px; raise data.resolution"
                )
    return resolution


def _unset(node: Any, key: str) -> bool:
    return key not in node or OmegaConf.is_missing(node, key) or not str(node[key] or "").strip()


def resolve_concepts(cfg: Any) -> list[Concept]:
    """The concepts of a ``data`` config, without reading any file (no items yet): the single form
    (``data.instance_dir``, ``instance_prompt``, ``class_dir``, ``class_prompt``, ``subject``, ``mask_token``)
    as one concept keyed ``data``, or one per ``data.concepts[k]`` (its ``subject`` / ``mask_token``
    defaulting to ``data.subject`` / ``data.mask_token``). Checks that the needed keys are set and
    that concept tokens are distinct."""
    entries = cfg.get("concepts")
    if entries is None:
        for key in ("instance_dir", "instance_prompt"):
            if _unset(cfg, key):
                raise SubjectDataError(f"config key 'data.{key}' must be set (e.g. data.{key}=...), or data.concepts")
        return [Concept((), cfg.instance_prompt, class_prompt=cfg.class_prompt, subject=cfg.subject, instance_dir=str(cfg.instance_dir),
                        class_dir=cfg.class_dir, mask_token=cfg.mask_token)]
    if len(entries) == 0:
        raise SubjectDataError("config key 'data.concepts': is empty (list one {instance_dir, instance_prompt, ...} per subject, or set it to null)")
    for key in ("instance_dir", "instance_prompt", "class_dir", "class_prompt"):
        if not _unset(cfg, key):
            raise SubjectDataError(f"config key 'data.{key}': set it per concept (data.concepts[k].{key}) when data.concepts is used")
    concepts, owners = [], {}
    for k, entry in enumerate(entries):
        key = f"data.concepts[{k}]"
        for name in ("instance_dir", "instance_prompt"):
            if _unset(entry, name):
                raise SubjectDataError(f"config key '{key}.{name}' must be set")
        token = entry.get("token")
        if token is not None:
            if not token.strip():
                raise SubjectDataError(f"config key '{key}.token': is empty (leave it unset or name the concept's word)")
            if token in owners:
                raise SubjectDataError(f"config key '{key}.token': {token!r} is already the token of data.concepts[{owners[token]}]; tokens must be distinct")
            owners[token] = k
        concepts.append(Concept(
            (), entry.instance_prompt, class_prompt=entry.get("class_prompt"), subject=entry.get("subject") or cfg.subject, token=token,
            key=key, instance_dir=str(entry.instance_dir), class_dir=entry.get("class_dir"), mask_token=entry.get("mask_token") or cfg.mask_token,
        ))
    return concepts


def concept_folders(concepts: Sequence[Concept]) -> dict[str, str | None]:
    """The folders a run reads (photos, class images), named for errors, which an export must not replace."""
    folders = {}
    for concept in concepts:
        folders[f"the subject photos ({concept.key}.instance_dir)"] = concept.instance_dir
        folders[f"the class images ({concept.key}.class_dir)"] = concept.class_dir
    return folders


def validate_subject_data(
    cfg: Any,
    required_tokens: Sequence[str] = (),
    prior_preservation: bool = False,
    vae_scale_factor: int | None = None,
    model_resolution: int | None = None,
) -> list[Concept]:
    """Check the whole data config before training: folders, every image and caption, prompts, sizes;
    returns the concepts with their items.

    `required_tokens` (TI placeholders, Custom Diffusion modifiers) must appear in every prompt an
    instance example can get (instance prompt, captions, templates filled with the subject). With
    ``data.concepts`` each concept names its own token (one of them) and only its prompts need it.
    """
    if cfg.repeats < 1 or cfg.batch_size < 1 or cfg.num_workers < 0:
        raise SubjectDataError("config keys 'data.repeats' and 'data.batch_size' must be >= 1 and 'data.num_workers' >= 0")
    if not 0.0 <= cfg.flip_p <= 1.0:
        raise SubjectDataError(f"config key 'data.flip_p': {cfg.flip_p} is not a probability")
    if not 0.0 <= cfg.caption_dropout < 1.0:
        raise SubjectDataError(f"config key 'data.caption_dropout': {cfg.caption_dropout} must be in [0, 1)")
    if cfg.keep_tokens < 0:
        raise SubjectDataError(f"config key 'data.keep_tokens': {cfg.keep_tokens} must be >= 0")
    check_resolution(cfg, vae_scale_factor, model_resolution)
    templates = resolve_templates(cfg)
    if cfg.masks not in (None, "files", "attention"):
        raise SubjectDataError(f"config key 'data.masks': {cfg.masks!r} is not one of null, files, attention")
    if cfg.masks == "attention" and (not 0.0 <= cfg.mask_threshold <= 1.0 or cfg.mask_dilation < 0):
        raise SubjectDataError("config keys 'data.mask_threshold' must be in [0, 1] and 'data.mask_dilation' >= 0")
    concepts = resolve_concepts(cfg)
    several = cfg.get("concepts") is not None
    if several and required_tokens:  # TI / Custom Diffusion: every trained token belongs to exactly one concept
        for concept in concepts:
            if concept.token not in required_tokens:
                raise SubjectDataError(f"config key '{concept.key}.token': {concept.token!r} must be one of the tokens this method trains {list(required_tokens)}")
        unclaimed = [t for t in required_tokens if t not in {c.token for c in concepts}]
        if unclaimed:
            raise SubjectDataError(f"the method's tokens {unclaimed} belong to no concept (set data.concepts[k].token), so they would never train")
    every_token = list(required_tokens) + [c.token for c in concepts if c.token and c.token not in required_tokens]
    return [_validate_concept(cfg, concept, templates, ([concept.token] if concept.token else []) if several else list(required_tokens),
                              every_token, prior_preservation) for concept in concepts]


def _validate_concept(cfg: Any, concept: Concept, templates: list[str] | None, tokens: Sequence[str], every_token: Sequence[str],
                      prior_preservation: bool) -> Concept:
    """One concept's checks (see `validate_subject_data`); `tokens` must be in its prompts, none of `every_token` in its class prompt."""
    key = concept.key
    if templates is not None and not concept.subject:
        raise SubjectDataError(f"config key '{key}.subject' must be set when data.prompt_templates is used (it fills the '{{}}')")
    if cfg.masks == "attention" and not (concept.mask_token or "").strip():
        raise SubjectDataError(f"config key '{key}.mask_token' must be set with data.masks=attention (the word naming the subject, e.g. dog)")
    items = read_instance_items(concept.instance_dir, cfg.captions, cfg.masks == "files", key=f"{key}.instance_dir")

    prompts = {f"config key '{key}.instance_prompt'": concept.instance_prompt}
    if templates is not None:
        where = "data.subject" if key == "data" or concept.subject == cfg.subject else f"{key}.subject"
        prompts = {f"template {t!r} with {where}": t.format(concept.subject) for t in templates}
    for item in items:
        if item.caption is not None:
            prompts[f"caption file {item.path.with_suffix('.txt')}"] = item.caption
    if cfg.masks == "attention":
        mask_prompts = {f"config key '{key}.instance_prompt'": concept.instance_prompt}
        mask_prompts.update({f"caption file {i.path.with_suffix('.txt')}": i.caption for i in items if i.caption is not None})
        for where, prompt in mask_prompts.items():  # the prompts the masks are computed with
            if concept.mask_token.strip() not in prompt:
                raise SubjectDataError(f"{where}: prompt {prompt!r} does not contain {key}.mask_token {concept.mask_token!r}")
    for token in tokens:
        for where, prompt in prompts.items():
            if token not in prompt:
                raise SubjectDataError(f"{where}: prompt {prompt!r} does not contain the token {token!r} that this method trains"
                                       if key == "data" else f"{where}: prompt {prompt!r} does not contain {key}.token {token!r}")

    if prior_preservation:
        if not (concept.class_prompt or "").strip():
            raise SubjectDataError(f"config key '{key}.class_prompt' must be set when loss.prior_preservation is on (e.g. 'a photo of a dog')")
        if cfg.num_class_images < 1:
            raise SubjectDataError("config key 'data.num_class_images' must be >= 1 with prior preservation")
        for token in every_token:
            if token in concept.class_prompt:
                raise SubjectDataError(f"config key '{key}.class_prompt': {concept.class_prompt!r} must not contain the trained token {token!r}")
        if concept.class_dir and Path(concept.class_dir).exists() and not Path(concept.class_dir).is_dir():
            raise SubjectDataError(f"config key '{key}.class_dir': {concept.class_dir} is not a folder")
        if concept.class_dir and Path(concept.class_dir).is_dir() and cfg.captions:
            for text in sorted(Path(concept.class_dir).glob("*.txt")):  # class images' own captions (kohya's regularization captions)
                caption = text.read_text(encoding="utf-8", errors="replace")
                for token in every_token:
                    if token in caption:
                        raise SubjectDataError(f"caption file {text} (a class image's): {caption.strip()!r} must not contain "
                                               f"the trained token {token!r}")
    return replace(concept, items=items)


# ----------------------------------------------------------------------------- class images
@torch.no_grad()
def generate_class_images(
    backbone: Any,
    prompt: str,
    directory: str | Path,
    count: int,
    steps: int = 25,
    guidance_scale: float = 7.5,
    batch_size: int = 4,
    seed: int = 0,
    progress: bool = True,
) -> list[Path]:
    """Fill `directory` up to `count` images of `prompt` sampled by `backbone` (DDIM); existing ones are kept.

    Image ``k`` is drawn with seed ``seed + k``, written atomically as ``class_<k>.png``.
    """
    from tqdm.auto import tqdm

    from dreamsteer.diffusion.schedulers import make_scheduler

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    existing = list_images(directory)
    missing = count - len(existing)
    if missing <= 0:
        return existing
    taken = {p.name for p in existing}
    indices = [k for k in range(count + len(existing)) if f"class_{k:05d}.png" not in taken][:missing]
    pipe = backbone.pipeline(make_scheduler("ddim", backbone.scheduler.config))
    autocast = torch.autocast(backbone.device.type, dtype=backbone.dtype) if backbone.dtype != torch.float32 else contextlib.nullcontext()
    with autocast, tqdm(total=missing, desc="class images", disable=not progress) as bar:
        for start in range(0, missing, batch_size):
            chunk = indices[start : start + batch_size]
            generators = [torch.Generator("cpu").manual_seed(seed + k) for k in chunk]
            images = pipe(**backbone.family.pipeline_prompt_kwargs(backbone.encode_prompt([prompt] * len(chunk))),
                          num_inference_steps=steps, guidance_scale=guidance_scale, generator=generators).images
            for k, image in zip(chunk, images):
                save_image_atomic(image, directory / f"class_{k:05d}.png")
            bar.update(len(chunk))
    return list_images(directory)


# ----------------------------------------------------------------------------- dataset
def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (splitmix-style), so nearby (seed, i) give unrelated streams."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h ^= (v + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2)) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


# Custom Diffusion's caption prefixes for zoomed-out / zoomed-in views (diffusers' train_custom_diffusion.py)
ZOOM_OUT_PREFIXES = ("a far away ", "very small ")
ZOOM_IN_PREFIXES = ("zoomed in ", "close up ")


class SubjectDataset(Dataset):
    """Example ``i`` of the endless instance (+ class) stream of one or more concepts; see the module docstring.

    Returns ``pixel_values`` [3, R, R] (with buckets [3, H, W] of the image's bucket, the same for
    every example of a micro-batch of `batch_size`) in [-1, 1], ``prompt``, ``example_index``, ``latent_key``
    (a string naming the image, its size, crop and flip: equal keys mean equal pixels; "" for a view
    not worth caching), SDXL's size conditions ``original_size`` (the file's (height, width)) and
    ``crop_top_left`` ((top, left) of the crop in the resized image, mirrored for a flipped view:
    ``left = W - left - w``), with masks ``loss_mask`` [1, H, W] in [0, 1] (the same crop and flip), and,
    with class images (the concept's own, cropped to the same size), ``class_pixel_values``,
    ``class_latent_key``, ``class_original_size``, ``class_crop_top_left`` and ``class_prompt``. Caption dropout and shuffling (instance prompts only)
    draw from their own generator, so turning them on leaves every crop and flip as it was.

    Concepts are balanced: without buckets example ``i`` is concept ``i mod K``'s; with buckets each
    epoch's plan holds every concept's images ``ceil(N_max / N_c)`` times (whole passes, so every
    epoch has the same batches per bucket).

    `resize_augmentation` (Custom Diffusion, Kumari et al. 2023, as diffusers' example): the view is
    scaled by ``s / R``, ``s ~ U{max(R // 3, 3 latent px), R}`` with probability 0.66, else
    ``U{1.2 R, 1.4 R - 1}``. Zoomed out (``s <= R``) it is pasted at a random place of a
    zero (mid-grey) canvas and ``loss_mask`` keeps the latent pixels inside the pasted rectangle
    less a one-latent-pixel border (diffusers' valid region: the VAE blends the canvas into the border
    latents); zoomed in it is randomly cropped back and every pixel counts. A mask file's view is
    scaled and placed the same way and multiplied in. Prompts of views with ``s < 0.6 R`` get
    "a far away " / "very small " in front, zoomed-in ones "zoomed in " / "close up ". Its draws use
    a generator of ``(seed, i, 4)``, so every other draw stays as without it.
    """

    def __init__(
        self,
        concepts: Sequence[Concept],
        resolution: int,
        seed: int = 0,
        center_crop: bool = True,
        flip_p: float = 0.5,
        repeats: int = 1,
        shuffle: bool = True,
        templates: Sequence[str] | None = None,
        caption_dropout: float = 0.0,
        shuffle_captions: bool = False,
        keep_tokens: int = 0,
        bucket_step: int | None = None,
        batch_size: int = 1,
        resize_augmentation: bool = False,
        vae_scale_factor: int = 8,
    ):
        self.concepts = list(concepts)
        self.items = [[item for item in concept.items for _ in range(repeats)] for concept in self.concepts]
        self.resolution = resolution
        self.seed = seed
        self.center_crop = center_crop
        self.flip_p = flip_p
        self.shuffle = shuffle
        self.templates = list(templates) if templates else None
        self.caption_dropout = caption_dropout
        self.shuffle_captions = shuffle_captions
        self.keep_tokens = keep_tokens
        self.resize_augmentation = resize_augmentation
        self.vae_scale_factor = vae_scale_factor
        self._cache: dict[tuple[Path, tuple[int, int]], tuple[Image.Image, Image.Image | None, tuple[int, int]]] = {}
        self._orders: dict[tuple[str, int, int], torch.Tensor] = {}
        self.batch_size = batch_size
        self.buckets = aspect_buckets(resolution, bucket_step) if bucket_step else None
        self._pool: list[tuple[int, int]] = []  # with buckets: (concept, item) of one epoch, before the plan's shuffle
        self._pool_bucket: list[int] = []
        if self.buckets:
            most = max(len(items) for items in self.items)
            for c, items in enumerate(self.items):
                buckets = [nearest_bucket(load_image(item.path).size, self.buckets) for item in items]
                for _ in range(-(-most // len(items))):
                    self._pool += [(c, p) for p in range(len(items))]
                    self._pool_bucket += buckets
        self._plans: dict[int, list[list[int]]] = {}

    def __len__(self) -> int:  # one pass over the (repeated) instance images; the stream itself is endless
        return sum(len(items) for items in self.items)

    def _order(self, name: str, size: int, epoch: int, concept: int = 0) -> torch.Tensor:
        key = (name, epoch, concept)
        if key not in self._orders:
            if len(self._orders) > 8 + 4 * len(self.concepts):
                self._orders.clear()
            extra = (concept,) if concept else ()  # concept 0 draws what a single-concept run draws
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 1 if name == "class" else 0, *extra))
            self._orders[key] = torch.randperm(size, generator=g) if self.shuffle else torch.arange(size)
        return self._orders[key]

    def _bucket_batch(self, index: int) -> tuple[int, tuple[int, int]]:
        """With buckets: the pool entry of example `index` and its bucket. Micro-batch ``g = index // B`` is
        batch ``g mod K`` of epoch ``g // K`` of a plan drawn from ``(seed, epoch)``: each bucket's entries
        shuffled, padded cyclically to a multiple of B, cut into batches of B, the K batches shuffled."""
        g, j = divmod(index, self.batch_size)
        first = self._plan(0)
        epoch, position = divmod(g, len(first))
        entry = self._plan(epoch)[position][j]
        return entry, self.buckets[self._pool_bucket[entry]]

    def _plan(self, epoch: int) -> list[list[int]]:
        if epoch not in self._plans:
            if len(self._plans) > 8:
                self._plans.clear()
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 3))
            batches = []
            for k in range(len(self.buckets)):
                members = [i for i, b in enumerate(self._pool_bucket) if b == k]
                if not members:
                    continue
                if self.shuffle:
                    members = [members[int(m)] for m in torch.randperm(len(members), generator=g)]
                padded = [members[m % len(members)] for m in range(-(-len(members) // self.batch_size) * self.batch_size)]
                batches += [padded[s : s + self.batch_size] for s in range(0, len(padded), self.batch_size)]
            if self.shuffle:
                batches = [batches[int(m)] for m in torch.randperm(len(batches), generator=g)]
            self._plans[epoch] = batches
        return self._plans[epoch]

    def _resized(self, path: Path, size: tuple[int, int], mask: Path | None = None) -> tuple[Image.Image, Image.Image | None, tuple[int, int]]:
        """The image (and its mask) resized to cover `size` (W, H), decoded and resized once per path and size,
        and the image's own (W, H)."""
        key = (path, size)
        if key not in self._cache:
            image = load_image(path)
            scale = max(size[0] / image.size[0], size[1] / image.size[1])
            resized = (max(size[0], round(image.size[0] * scale)), max(size[1], round(image.size[1] * scale)))
            resized_mask = load_mask(mask, image.size).resize(resized, Image.Resampling.BILINEAR) if mask is not None else None
            self._cache[key] = (image.resize(resized, Image.Resampling.BICUBIC), resized_mask, image.size)
        return self._cache[key]

    def _view(
        self, path: Path, generator: torch.Generator, mask: Path | None = None, size: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, str, torch.Tensor | None, dict[str, torch.Tensor]]:
        """One augmented view (crop to `size` (W, H), default R x R; flip) of an image, the key naming that
        view (for latent caching), the same view of its mask as weights ``[1, H, W]`` in [0, 1] (None without a mask),
        and its size conditions ``{"original_size": (H0, W0), "crop_top_left": (top, left)}`` (see the class docstring)."""
        size = size or (self.resolution, self.resolution)
        (image, mask_image, (w0, h0)), (w, h) = self._resized(path, size, mask), size
        width, height = image.size
        if self.center_crop:
            left, top = (width - w) // 2, (height - h) // 2
        else:
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
        box = (left, top, left + w, top + h)
        tensor = pil_to_tensor(image.crop(box))
        weights = torch.from_numpy(np.asarray(mask_image.crop(box), dtype=np.float32) / 255.0)[None] if mask_image is not None else None
        flip = torch.rand((), generator=generator).item() < self.flip_p
        if flip:
            tensor = tensor.flip(-1)
            weights = weights.flip(-1) if weights is not None else None
        crop_left = width - left - w if flip else left  # where the crop lies in the flipped image
        conditions = {"original_size": torch.tensor([h0, w0]), "crop_top_left": torch.tensor([top, crop_left])}
        return tensor, f"{path}|{w}x{h}|{left},{top}|{int(flip)}", weights, conditions

    def _caption(self, prompt: str, index: int) -> str:
        """Caption dropout, then tag shuffling after the first `keep_tokens` tags, from a generator of ``(seed, i, 2)``."""
        if not (self.caption_dropout or self.shuffle_captions):
            return prompt
        g = torch.Generator().manual_seed(mix_seed(self.seed, index, 2))
        if torch.rand((), generator=g).item() < self.caption_dropout:
            return ""
        if self.shuffle_captions:
            tags = [tag.strip() for tag in prompt.split(",")]
            kept, rest = tags[: self.keep_tokens], tags[self.keep_tokens :]
            prompt = ", ".join(kept + [rest[int(k)] for k in torch.randperm(len(rest), generator=g)])
        return prompt

    def _resize_augmented(self, pixels: torch.Tensor, weights: torch.Tensor | None, index: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        """Custom Diffusion's resize augmentation of a view [3, h, w] (and its mask [1, h, w]): the new
        pixels, the loss mask (valid region times the mask) and the caption prefix; see the class docstring."""
        g = torch.Generator().manual_seed(mix_seed(self.seed, index, 4))
        r, f = self.resolution, self.vae_scale_factor
        h, w = pixels.shape[-2:]
        low = min(r, max(r // 3, math.ceil(3 * f * r / min(h, w))))  # at least 3 latent pixels: a valid region is left
        if torch.rand((), generator=g).item() < 0.66:
            scale = int(torch.randint(low, r + 1, (), generator=g))
        else:
            scale = int(torch.randint(int(1.2 * r), int(1.4 * r), (), generator=g))
        sh, sw = round(h * scale / r), round(w * scale / r)
        stack = pixels if weights is None else torch.cat([pixels, weights])
        resized = F.interpolate(stack[None], size=(sh, sw), mode="bilinear", antialias=True, align_corners=False)[0]
        if scale <= r:  # zoomed out: paste into the canvas
            top = int(torch.randint(0, h - sh + 1, (), generator=g))
            left = int(torch.randint(0, w - sw + 1, (), generator=g))
            canvas = torch.zeros_like(stack)
            canvas[:, top : top + sh, left : left + sw] = resized
            valid = torch.zeros_like(pixels[:1])
            valid[:, (top // f + 1) * f : ((top + sh) // f - 1) * f, (left // f + 1) * f : ((left + sw) // f - 1) * f] = 1.0
        else:  # zoomed in: crop back to the view's size
            top = int(torch.randint(0, sh - h + 1, (), generator=g))
            left = int(torch.randint(0, sw - w + 1, (), generator=g))
            canvas = resized[:, top : top + h, left : left + w]
            valid = torch.ones_like(pixels[:1])
        prefix = ""
        if scale < 0.6 * r:
            prefix = ZOOM_OUT_PREFIXES[int(torch.randint(2, (), generator=g))]
        elif scale > r:
            prefix = ZOOM_IN_PREFIXES[int(torch.randint(2, (), generator=g))]
        mask = valid if weights is None else valid * canvas[3:]
        return canvas[:3], mask, prefix

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.buckets:
            entry, size = self._bucket_batch(index)
            c, position = self._pool[entry]
            draw = index  # the concept's class-image counter
        else:
            c, draw = index % len(self.concepts), index // len(self.concepts)
            n = len(self.items[c])
            position, size = int(self._order("instance", n, draw // n, c)[draw % n]), None
        concept, item = self.concepts[c], self.items[c][position]
        g = torch.Generator().manual_seed(mix_seed(self.seed, index))
        if item.caption is not None:
            prompt = item.caption
        elif self.templates is not None:
            prompt = self.templates[int(torch.randint(len(self.templates), (), generator=g))].format(concept.subject)
        else:
            prompt = concept.instance_prompt
        pixels, key, weights, conditions = self._view(item.path, g, item.mask, size)
        prompt = self._caption(prompt, index)
        if self.resize_augmentation:
            pixels, weights, prefix = self._resize_augmented(pixels, weights, index)
            key = ""  # nearly every augmented view is new: encoded each time, never cached
            prompt = prefix + prompt if prompt else prompt  # a dropped caption stays unconditional
        example = {"pixel_values": pixels, "prompt": prompt, "example_index": index, "latent_key": key, **conditions}
        if weights is not None:
            example["loss_mask"] = weights
        if concept.class_paths:
            count = len(concept.class_paths)
            k = int(self._order("class", count, draw // count, c)[draw % count])
            example["class_pixel_values"], example["class_latent_key"], _, conditions = self._view(concept.class_paths[k], g, size=size)
            example.update({f"class_{name}": value for name, value in conditions.items()})
            caption = concept.class_captions[k] if concept.class_captions else None
            example["class_prompt"] = caption or concept.class_prompt
        return example


class StepBatchSampler(Sampler[list[int]]):
    """Endless batches of example indices: micro-batch ``b`` of `rank` is ``[(b*W + rank)*B + j]``, from `start_batch` on."""

    def __init__(self, batch_size: int, start_batch: int = 0, rank: int = 0, world_size: int = 1):
        self.batch_size = batch_size
        self.start_batch = start_batch
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[list[int]]:
        b = self.start_batch
        while True:
            first = (b * self.world_size + self.rank) * self.batch_size
            yield list(range(first, first + self.batch_size))
            b += 1


# ----------------------------------------------------------------------------- DataModule
class SubjectDataModule(L.LightningDataModule):
    """Instance (+ generated class) images of one or more concepts as an endless, resumable stream.

    ``prepare_data`` (local rank 0 of each node, before the other ranks start reading) generates
    each concept's missing class images with the LightningModule's ``backbone``; ``train_dataloader``
    starts the stream at the trainer's restored ``global_step`` and shards it by rank itself, so the
    Trainer must run with ``use_distributed_sampler=False``. With prior preservation every concept
    needs its ``class_dir`` set (``train.personalize`` fills in the defaults).
    """

    def __init__(
        self,
        cfg: Any,
        concepts: Sequence[Concept],
        resolution: int,
        seed: int = 0,
        prior_preservation: bool = False,
        progress: bool = True,
        vae_scale_factor: int = 8,
    ):
        super().__init__()
        self.progress = progress
        self.cfg = cfg
        self.concepts = list(concepts)
        self.resolution = resolution
        self.seed = seed
        self.prior_preservation = prior_preservation
        self.vae_scale_factor = vae_scale_factor

    def prepare_data(self) -> None:
        if not self.prior_preservation:
            return
        for concept in self.concepts:
            class_dir = Path(concept.class_dir)
            have = len(list_images(class_dir)) if class_dir.is_dir() else 0
            if have >= self.cfg.num_class_images:
                continue
            backbone = self.trainer.lightning_module.backbone
            backbone.to(self.trainer.strategy.root_device)
            # Before fit and before a checkpoint is restored, the freshly attached adapter computes the
            # base model (LoRA B = 0, Custom Diffusion k/v = originals, DreamBooth = base, TI rows unused).
            generate_class_images(
                backbone, concept.class_prompt, class_dir, self.cfg.num_class_images,
                steps=self.cfg.class_steps, guidance_scale=self.cfg.class_guidance_scale,
                batch_size=self.cfg.class_batch_size, seed=self.seed, progress=self.progress,
            )

    def setup(self, stage: str | None = None) -> None:
        if not self.prior_preservation:
            return
        concepts = []
        for concept in self.concepts:
            needed = self.cfg.num_class_images
            items = read_instance_items(concept.class_dir, self.cfg.captions, key=f"{concept.key}.class_dir")[:needed]
            if len(items) < needed:
                raise SubjectDataError(f"config key '{concept.key}.class_dir': {concept.class_dir} holds {len(items)} images, {needed} needed")
            concepts.append(replace(concept, class_paths=[i.path for i in items], class_captions=[i.caption for i in items]))
        self.concepts = concepts

    def dataset(self) -> SubjectDataset:
        cfg = self.cfg
        return SubjectDataset(
            self.concepts, self.resolution, seed=self.seed, center_crop=cfg.center_crop,
            flip_p=cfg.flip_p, repeats=cfg.repeats, shuffle=cfg.shuffle, templates=resolve_templates(cfg),
            caption_dropout=cfg.caption_dropout, shuffle_captions=cfg.shuffle_captions, keep_tokens=cfg.keep_tokens,
            bucket_step=cfg.bucket_step if cfg.buckets else None, batch_size=cfg.batch_size,
            resize_augmentation=bool(cfg.get("resize_augmentation")), vae_scale_factor=self.vae_scale_factor,
        )

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        start, rank, world = 0, 0, 1
        if trainer is not None:
            start = trainer.global_step * trainer.accumulate_grad_batches
            rank, world = trainer.global_rank, trainer.world_size
        sampler = StepBatchSampler(self.cfg.batch_size, start, rank, world)
        return DataLoader(
            self.dataset(), batch_sampler=sampler, num_workers=self.cfg.num_workers,
            persistent_workers=self.cfg.num_workers > 0, pin_memory=torch.cuda.is_available(),
        )

