"""CLIP-based metrics: CLIP-T, CLIP-R, CLIP-I (LUSD, DreamSteerer) and the masked CLIP score (Ground-A-Score).

CLIP runs through transformers (`CLIPModel`, a CLIP tokenizer and the PIL CLIP image processor, so
no torchvision) from a local folder or a hub id. Embeddings are the projected, L2-normalized
image / text features, as OpenAI's `encode_image` / `encode_text` that the papers' code used.
`build_tiny_clip` writes a small random CLIP folder offline, for tests and the demo.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image


class ModelUnavailableError(ValueError):
    """A metric model that cannot be loaded (missing folder, unreachable hub, wrong files)."""


def load_pretrained(kind: str, source: str, load: Callable[[str], Any]) -> Any:
    """`load(source)` for a local folder or hub id, every failure as ModelUnavailableError naming `kind` and `source`."""
    if not source:
        raise ModelUnavailableError(f"no {kind} model given")
    looks_local = os.path.isabs(source) or source.startswith(".") or os.path.exists(source)
    if looks_local and not Path(source).is_dir():
        raise ModelUnavailableError(f"{kind} model {source}: folder not found")
    try:
        return load(source)
    except (OSError, ValueError, KeyError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelUnavailableError(f"{kind} model {source}: cannot be loaded ({first_line})") from err


def _image_processor_class():
    try:  # transformers >= 5 names the PIL implementation; older versions only have the PIL one
        from transformers import CLIPImageProcessorPil

        return CLIPImageProcessorPil
    except ImportError:
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor


class ClipEmbedder:
    """Projected, unit-length CLIP embeddings of images and texts.

    e_img(x) = P_v(ViT(preprocess(x))) / ||.||,  e_txt(y) = P_t(TextTransformer(tokens(y))_eos) / ||.||,
    so the cosine similarity of an image and a text is the dot product of their embeddings.
    Preprocessing is CLIP's: resize the short side (bicubic), center crop, normalize.
    """

    def __init__(self, model, processor, tokenizer, device: str = "cpu", source: str = "", batch_size: int = 16):
        self.model = model.to(device).eval().requires_grad_(False)
        self.processor = processor
        self.tokenizer = tokenizer
        self.device = device
        self.source = source
        self.batch_size = batch_size

    @classmethod
    def load(cls, source: str, device: str = "cpu", batch_size: int = 16) -> "ClipEmbedder":
        """Load CLIP from a local folder or a hub id; raises ModelUnavailableError naming `source`."""
        from transformers import AutoTokenizer, CLIPModel

        model, processor, tokenizer = load_pretrained("CLIP", source, lambda src: (
            CLIPModel.from_pretrained(src, use_safetensors=True),
            _image_processor_class().from_pretrained(src),
            AutoTokenizer.from_pretrained(src),
        ))
        return cls(model, processor, tokenizer, device, source, batch_size)

    @torch.no_grad()
    def images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """[N, D] unit-length image embeddings (float32, CPU)."""
        out = []
        for i in range(0, len(images), self.batch_size):
            batch = [im.convert("RGB") for im in images[i : i + self.batch_size]]
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device)
            pooled = self.model.vision_model(pixel_values=pixels).pooler_output
            out.append(self.model.visual_projection(pooled).float().cpu())
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)

    @torch.no_grad()
    def texts(self, prompts: Sequence[str]) -> torch.Tensor:
        """[N, D] unit-length text embeddings; prompts are truncated to CLIP's 77 tokens (with a warning)."""
        from dreamsteer.diffusion.backbone import warn_if_truncated

        warn_if_truncated(self.tokenizer, prompts, prompts)
        out = []
        for i in range(0, len(prompts), self.batch_size):
            tokens = self.tokenizer(
                list(prompts[i : i + self.batch_size]), padding=True, truncation=True, max_length=77, return_tensors="pt"
            ).to(self.device)
            pooled = self.model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output
            out.append(self.model.text_projection(pooled).float().cpu())
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """cos(a, b) = <a, b> / (||a|| ||b||) of two 1-D embeddings."""
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def clip_t(edited: torch.Tensor, text: torch.Tensor) -> float:
    """CLIP-T (LUSD Sec. 4.2, after MagicBrush): CosineSim(CLIP(x), CLIP(y)), the edited image x against
    the text describing the edit (LUSD: the local description y_local; we use the job's
    `local_prompt` when given, else its target prompt)."""
    return cosine(edited, text)


def clip_r(edited: torch.Tensor, source: torch.Tensor, target_text: torch.Tensor) -> Optional[float]:
    """CLIP-R (LUSD Eq. 5): CosineSim(CLIP(x), CLIP(y_tgt)) / CosineSim(CLIP(x_src), CLIP(y_tgt)).

    How much more the edited image x matches the target prompt than the source x_src does: an
    unchanged image gives exactly 1. Undefined (None) when the source's similarity is not
    positive, where the ratio no longer orders edits.
    """
    denominator = cosine(source, target_text)
    if denominator <= 0:
        return None
    return cosine(edited, target_text) / denominator


def clip_i(edited: torch.Tensor, reference: torch.Tensor) -> float:
    """CLIP-I: CosineSim(CLIP(x), CLIP(x_ref)) of two images. LUSD's L1*/CLIP-I* use it with the
    reference = the source image (or a ground-truth edit when a job names one)."""
    return cosine(edited, reference)


def clip_i_concept(edited: torch.Tensor, references: torch.Tensor) -> float:
    """DreamSteerer's CLIP-I (concept alignment, after DreamBooth): the mean over the personal
    concept's reference photos r_j of CosineSim(CLIP(x), CLIP(r_j))."""
    return float((references.double() @ edited.flatten().double() / (references.double().norm(dim=-1) * edited.double().norm())).mean())


def clip_score(image: torch.Tensor, text: torch.Tensor, weight: float = 100.0) -> float:
    """CLIPScore (Hessel et al. 2021) as torchmetrics reports it: w * max(CosineSim(image, text), 0), w = 100."""
    return weight * max(cosine(image, text), 0.0)


def masked_region(image: Image.Image, mask: np.ndarray) -> Image.Image:
    """The image cropped to the bounding box of a binary mask [H, W], pixels outside the mask set to black.

    For a box mask (Ground-A-Score's grounding boxes) this is the plain crop of the box.
    """
    mask = np.asarray(mask).astype(bool)
    if mask.shape != (image.height, image.width):
        raise ValueError(f"masked region: mask {mask.shape} does not match image {image.height}x{image.width}")
    if not mask.any():
        raise ValueError("masked region: the mask is empty")
    rows, cols = np.where(mask.any(1))[0], np.where(mask.any(0))[0]
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    pixels = np.asarray(image.convert("RGB")).copy()
    pixels[~mask] = 0
    return Image.fromarray(pixels[top:bottom, left:right])


def masked_clip_score(region_embeddings: torch.Tensor, phrase_embeddings: torch.Tensor) -> float:
    """Ground-A-Score's masked CLIP score, as we read it: the mean over edited regions k of
    CLIPScore(crop_k(x), phrase_k), crop_k = the edited image inside region k (`masked_region`)
    and phrase_k the text that region should show (a subtask's target phrase, or the target
    prompt for a job with one edit mask)."""
    if region_embeddings.shape[0] != phrase_embeddings.shape[0] or region_embeddings.shape[0] == 0:
        raise ValueError(f"masked CLIP score: {region_embeddings.shape[0]} regions for {phrase_embeddings.shape[0]} phrases")
    return float(np.mean([clip_score(r, p) for r, p in zip(region_embeddings, phrase_embeddings)]))


def build_tiny_clip(directory: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny random CLIP (model, tokenizer, image processor) to `directory`, offline, and return it.

    32 px images in 8 px patches, width 32, 2 layers, projection 32, and the tiny diffusion model's
    word-level BPE tokenizer. Weights depend only on `seed`. An existing folder holding a CLIP
    config is returned as is. Written to a temp folder and renamed into place.
    """
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from dreamsteer.diffusion.tiny import write_tiny_tokenizer_files

    directory = Path(directory)
    if (directory / "config.json").is_file() and (directory / "preprocessor_config.json").is_file():
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=directory.name + ".", dir=directory.parent))
    try:
        write_tiny_tokenizer_files(tmp)
        tokenizer = CLIPTokenizer.from_pretrained(str(tmp), model_max_length=77)
        tokenizer.save_pretrained(str(tmp))
        shared = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
        config = CLIPConfig(
            text_config=dict(
                shared,
                vocab_size=len(tokenizer),
                max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            ),
            vision_config=dict(shared, image_size=32, patch_size=8),
            projection_dim=32,
        )
        torch.manual_seed(seed)
        CLIPModel(config).save_pretrained(str(tmp), safe_serialization=True)
        _image_processor_class()(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(str(tmp))
        if directory.exists():
            shutil.rmtree(directory)
        tmp.rename(directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory
