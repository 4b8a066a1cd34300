"""What an edit of a toy-world scene did, read by the toy detector (`metrics.detector`).

One function, `toy_edit_metrics`, scores every toy edit of the project: the effects benchmark
(`benchmarks/effects.py`), the floors (`benchmarks/toy_floors.py`), the demo's evaluation and the
``evaluate`` task's report on toy runs. The truth of an edit (`ToyEditTruth`) holds the source scene
(background, each object's mask and box) and what each object should be after the edit (`ToyObject`:
a color and shape, or the personal subject). The edited objects are those whose target differs from
the source. Metrics (8-bit RGB units for changes):

- ``success``: the detector reads the target scene: the source background, as many objects as the
  source, and at each object's place (mask IoU >= 0.5 with its source mask) an object that holds its
  target (color and shape; for the subject, a subject score >= 0.5);
- ``targets_hit``: fraction of the edited objects that hold their target at their place;
- ``others_kept`` / ``background_kept``: every unedited object holds its source attributes at its
  place / the background color is the source's;
- ``outside_change``: mean absolute change outside the union of the edited objects' masks dilated
  by `EDIT_MARGIN` pixels (`detector.outside_change`);
- ``box_iou``: mean over the edited objects of the box IoU between the source box and the box of the
  detected object overlapping its source mask most (0 when none overlaps): does the edit keep the
  object's place and size;
- ``subject_score``: the best subject score at the places that should become the subject (None when
  no object should).

`truth_from_scene` builds the truth from a rendered scene; `truth_from_prompts` from a source image
and a source / target caption pair of the toy grammar (the ``evaluate`` task's case: the detector
reads the source, the captions say what changes), where a caption may name the subject by any
identifier ("a sks circle", "a <sks> circle", "a <new1> circle"); `is_toy_edit` says whether an edit
is of the toy world at all (the ``evaluate`` task's ``toy_metrics=null``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image
from scipy.optimize import linear_sum_assignment

from dreamsteer.data.scenes import ARTICLE, BACKGROUND_COLORS, BACKGROUND_SUFFIX, OBJECT_COLORS, RESOLUTION, SHAPES, SUBJECT, Scene, SceneObject
from dreamsteer.metrics.detector import DetectedObject, box_iou, detect, match_masks, objects_at, outside_change, summary

EDIT_MARGIN = 2  # pixels around the edited objects' masks that an edit may change (anti-aliased edge, VAE blur)


class ToyTruthError(ValueError):
    """The truth of an edit cannot be established (a caption outside the toy grammar, a source the detector
    does not read as its caption); the message says why."""


@dataclass(frozen=True)
class ToyObject:
    """What an object is (or should become): a color and shape, or the personal subject (`subject`)."""

    color: str
    shape: str
    subject: bool = False

    @classmethod
    def of(cls, obj: SceneObject) -> "ToyObject":
        return cls(obj.color, obj.shape, obj.is_subject)

    def holds(self, found: DetectedObject | None) -> bool:
        """Whether a detected object is this one (None: nothing was found at its place)."""
        if found is None:
            return False
        if self.subject:
            return found.is_subject
        return found.color == self.color and found.shape == self.shape and not found.is_subject


@dataclass
class ToyEditTruth:
    """A source scene's truth (`background`, `masks` [N, H, W] bool, `boxes` [N, 4] xyxy) and each
    object's source (`before`) and target (`after`) description."""

    background: str
    masks: np.ndarray
    boxes: np.ndarray
    before: list[ToyObject]
    after: list[ToyObject]

    @property
    def edited(self) -> list[int]:
        return [i for i, (b, a) in enumerate(zip(self.before, self.after)) if b != a]


def truth_from_scene(scene: Scene, targets: Sequence[SceneObject]) -> ToyEditTruth:
    """The truth of editing `scene` so that its objects become `targets` (same order)."""
    if len(targets) != len(scene.objects):
        raise ValueError(f"{len(targets)} targets for a scene of {len(scene.objects)} objects")
    return ToyEditTruth(scene.background, np.asarray(scene.masks), np.asarray(scene.boxes),
                        [ToyObject.of(o) for o in scene.objects], [ToyObject.of(o) for o in targets])


def parse_toy_caption(caption: str) -> tuple[str, list[ToyObject]]:
    """A toy-grammar caption -> (background, objects), where "a <word> <class word>" with a word that is not
    a color names the personal subject. Raises ToyTruthError naming the caption otherwise."""
    head, sep, tail = caption.strip().rpartition(f" on {ARTICLE} ")
    background, _, suffix = tail.partition(" ")
    if not sep or background not in BACKGROUND_COLORS or suffix != BACKGROUND_SUFFIX:
        raise ToyTruthError(f"caption {caption!r}: does not end with 'on a <{'|'.join(BACKGROUND_COLORS)}> background'")
    objects = []
    for part in (p for chunk in head.split(" and ") for p in chunk.split(", ")):
        words = part.split()
        if len(words) == 3 and words[0] == ARTICLE and words[1] in OBJECT_COLORS and words[2] in SHAPES:
            objects.append(ToyObject(words[1], words[2]))
        elif len(words) == 3 and words[0] == ARTICLE and words[2] == SUBJECT.class_word:
            objects.append(ToyObject(SUBJECT.color, SUBJECT.shape, subject=True))
        else:
            raise ToyTruthError(f"caption {caption!r}: {part!r} is neither 'a <color> <shape>' nor 'a <identifier> {SUBJECT.class_word}'")
    return background, objects


def truth_from_prompts(source: Image.Image | np.ndarray, source_prompt: str, target_prompt: str) -> ToyEditTruth:
    """The truth of an edit from its source image and captions: the detector reads the source's objects
    (masks, boxes); they are paired one to one with the source caption's objects (most agreeing colors
    plus shapes); the target caption's i-th object is what the source caption's i-th object becomes."""
    background, before = parse_toy_caption(source_prompt)
    target_background, after = parse_toy_caption(target_prompt)
    if len(after) != len(before) or target_background != background:
        raise ToyTruthError(f"target prompt {target_prompt!r}: must name as many objects as the source prompt "
                            f"{source_prompt!r}, on the same background")
    detection = detect(source)
    if len(detection.objects) != len(before):
        raise ToyTruthError(f"the detector finds {len(detection.objects)} objects in the source, its caption "
                            f"{source_prompt!r} names {len(before)}")
    agree = np.array([[(o.color == b.color) + (o.shape == b.shape) for o in detection.objects] for b in before], dtype=float)
    rows, cols = linear_sum_assignment(-agree)
    order = [int(c) for _, c in sorted(zip(rows, cols))]
    masks = np.stack([detection.objects[k].mask for k in order])
    boxes = np.array([detection.objects[k].box for k in order])
    return ToyEditTruth(background, masks, boxes, before, after)


def toy_edit_metrics(source: Image.Image | np.ndarray, edited: Image.Image | np.ndarray, truth: ToyEditTruth,
                     margin: int = EDIT_MARGIN) -> dict[str, Any]:
    """What the detector reads in `edited` against the edit's truth (module docstring); JSON-ready."""
    detection = detect(edited)
    found = objects_at(detection, list(truth.masks))
    held = [target.holds(f) for target, f in zip(truth.after, found)]
    edited_ids = truth.edited
    unedited = [i for i in range(len(truth.after)) if i not in edited_ids]
    overlap = {t: d for d, t, _ in match_masks([o.mask for o in detection.objects], list(truth.masks))}
    ious = [box_iou(detection.objects[overlap[i]].box, truth.boxes[i]) if i in overlap else 0.0 for i in edited_ids]
    union = truth.masks[edited_ids].any(axis=0) if edited_ids else np.zeros(truth.masks.shape[1:], dtype=bool)
    subject_ids = [i for i in edited_ids if truth.after[i].subject]
    background_kept = detection.background == truth.background
    count_kept = len(detection.objects) == len(truth.after)
    return {
        "success": bool(background_kept and count_kept and all(held)),
        "targets_hit": float(np.mean([held[i] for i in edited_ids])) if edited_ids else None,
        "others_kept": bool(all(held[i] for i in unedited)),
        "background_kept": bool(background_kept),
        "count_kept": bool(count_kept),
        "outside_change": outside_change(source, edited, union, margin),
        "box_iou": float(np.mean(ious)) if ious else None,
        "subject_score": max((found[i].subject_score if found[i] is not None else 0.0 for i in subject_ids), default=None),
        "edited": edited_ids,
        "detection": summary(detection),
    }


TOY_METRICS = {  # key -> label, in report order
    "success": "success",
    "targets_hit": "targets hit",
    "others_kept": "others kept",
    "background_kept": "background kept",
    "outside_change": "change outside",
    "box_iou": "box IoU",
    "subject_score": "subject score",
}


def toy_summary_line(means: dict[str, Any]) -> str:
    """One line of `mean_metrics` values: "success 0.50, others kept 1.00, ... (n=4)"."""
    shown = ", ".join(f"{label} {means[key]:.2f}" for key, label in TOY_METRICS.items() if means.get(key) is not None)
    return f"{shown} (n={means['n']})"


def mean_metrics(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Rates and means of `toy_edit_metrics` records (None values left out); `n` records."""
    out: dict[str, Any] = {"n": len(records)}
    for key in TOY_METRICS:
        values = [float(r[key]) for r in records if r.get(key) is not None]
        out[key] = float(np.mean(values)) if values else None
    return out


def is_toy_edit(source: Image.Image, source_prompt: str, target_prompt: str) -> bool:
    """Whether an edit is of the toy world: a source of the world's resolution and two toy-grammar captions."""
    if source.size != (RESOLUTION, RESOLUTION):
        return False
    try:
        parse_toy_caption(source_prompt)
        parse_toy_caption(target_prompt)
    except ToyTruthError:
        return False
    return True
