"""Automatic subtask boxes from phrases with a local transformers zero-shot detector (OWLv2 / Grounding DINO).

Ground-A-Score grounds each subtask's phrase with GroundingDINO. We accept any model that
``AutoModelForZeroShotObjectDetection`` loads from a local folder (saved with ``save_pretrained``):
nothing is downloaded (``local_files_only=True``) and no remote code runs. For each phrase the
highest-scoring detection above `threshold` becomes a normalized xyxy box on the image given (the
source at the model resolution); a phrase with no detection gets ``None``.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image


MIN_SIDE = 1e-3  # detections thinner than this (normalized) are ignored


class GroundingError(ValueError):
    """A detector folder that cannot be loaded; the message names it."""


@lru_cache(maxsize=2)
def _load(model_path: str, device: str):
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

    if not Path(model_path).is_dir():
        raise GroundingError(f"grounding.model {model_path}: not a folder (a detector saved with save_pretrained)")
    try:
        processor = AutoProcessor.from_pretrained(model_path, local_files_only=True)
        model = AutoModelForZeroShotObjectDetection.from_pretrained(model_path, local_files_only=True).to(device).eval()
    except (OSError, ValueError, KeyError) as err:
        raise GroundingError(f"grounding.model {model_path}: not a zero-shot object detector transformers can load ({err})") from err
    return processor, model


@torch.no_grad()
def detect_boxes(image: Image.Image, phrases: Sequence[str], model_path: str, threshold: float = 0.3,
                 text_threshold: float = 0.25, device: str | torch.device = "cpu") -> list[list[float] | None]:
    """One normalized ``[x0, y0, x1, y1]`` (or None) per phrase, from the best detection of that phrase."""
    processor, model = _load(str(model_path), str(device))
    w, h = image.size
    grounding_dino = "GroundingDino" in type(model).__name__
    if grounding_dino:  # one text with every phrase; labels come back as the matched phrase text
        text = ". ".join(p.strip().lower() for p in phrases) + "."
        inputs = processor(images=image, text=text, return_tensors="pt").to(device)
        outputs = model(**inputs)
        result = processor.post_process_grounded_object_detection(
            outputs, inputs["input_ids"], threshold=threshold, text_threshold=text_threshold, target_sizes=[(h, w)])[0]
        labels = [str(label) for label in (result["text_labels"] if "text_labels" in result else result["labels"])]
        owner = [next((i for i, p in enumerate(phrases) if p.strip().lower() in label or label in p.strip().lower()), -1)
                 for label in labels]
    else:  # OWL-ViT / OWLv2: one query per phrase; labels are query indices
        inputs = processor(text=[list(phrases)], images=image, return_tensors="pt").to(device)
        outputs = model(**inputs)
        side = max(w, h)  # OWLv2 pads the image to a square before resizing
        result = processor.post_process_grounded_object_detection(outputs, threshold=threshold, target_sizes=[(side, side)])[0]
        owner = [int(label) for label in result["labels"]]
    boxes: list[list[float] | None] = [None] * len(phrases)
    best = [-1.0] * len(phrases)
    for box, score, i in zip(result["boxes"].tolist(), result["scores"].tolist(), owner):
        if i < 0 or score <= best[i]:
            continue
        x0, y0, x1, y1 = box
        clipped = [min(max(x0 / w, 0.0), 1.0), min(max(y0 / h, 0.0), 1.0), min(max(x1 / w, 0.0), 1.0), min(max(y1 / h, 0.0), 1.0)]
        if clipped[2] - clipped[0] > MIN_SIDE and clipped[3] - clipped[1] > MIN_SIDE:
            boxes[i], best[i] = clipped, score
    return boxes
