"""Seeded edit cases on the toy world, run through the ``edit`` task and scored by the detector.

Shared by the floors (`benchmarks/toy_floors.py`) and the effects benchmark (`benchmarks/effects.py`):

- `edit_case(kind, seed)`: a rendered source scene and what its objects should become. Kinds:
  ``color`` (one object of a 1-2 object scene gets another color), ``shape`` (one object gets another
  shape), ``two_colors`` (both objects of a 2-object scene get other colors: a multi-attribute edit);
- `edit_jobs` / `run_edit_jobs`: the cases as one jobs manifest of any editor methods, run by
  ``train edit`` (resumable, one model load per process, ``workers`` processes);
- `score_edit`: `metrics.toy_edit.toy_edit_metrics` of an edited image, plus the VAE's own
  reconstruction error of the source outside the edited objects (the floor an editor that moves
  latents cannot go below).
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from dreamsteer.data.images import pil_to_tensor, save_image_atomic, tensor_to_pil
from dreamsteer.data.scenes import BACKGROUND_COLORS, OBJECT_COLORS, RESOLUTION, SHAPES, Scene, SceneObject, make_caption, random_scene
from dreamsteer.metrics.detector import outside_change
from dreamsteer.metrics.toy_edit import EDIT_MARGIN, ToyEditTruth, toy_edit_metrics, truth_from_scene

EDIT_KINDS = ("color", "shape", "two_colors")
GROUNDING_MARGIN = 2  # pixels added around an edited object's box for Ground-A-Score's subtask region


@dataclass
class EditCase:
    """A source scene and the objects it should become (`targets`, the scene's order)."""

    id: str
    kind: str
    scene: Scene
    targets: list[SceneObject]

    @property
    def target_prompt(self) -> str:
        return make_caption(self.scene.background, self.targets)

    @property
    def truth(self) -> ToyEditTruth:
        return truth_from_scene(self.scene, self.targets)

    @property
    def edited(self) -> list[int]:
        return self.truth.edited


def _other(rng: np.random.Generator, values: Sequence[str], current: str) -> str:
    return str(rng.choice([v for v in values if v != current]))


def edit_case(kind: str, seed: int | Sequence[int], case_id: str, resolution: int = RESOLUTION) -> EditCase:
    """A seeded case of `kind` (module docstring)."""
    rng = np.random.default_rng(seed)
    if kind == "color":
        scene = random_scene(rng, 1, 2, resolution)
        k = int(rng.integers(len(scene.objects)))
        targets = [replace(o, color=_other(rng, list(OBJECT_COLORS), o.color)) if j == k else o for j, o in enumerate(scene.objects)]
    elif kind == "shape":
        scene = random_scene(rng, 1, 2, resolution)
        k = int(rng.integers(len(scene.objects)))
        targets = [replace(o, shape=_other(rng, SHAPES, o.shape)) if j == k else o for j, o in enumerate(scene.objects)]
    elif kind == "two_colors":
        scene = random_scene(rng, 2, 2, resolution)
        targets = [replace(o, color=_other(rng, list(OBJECT_COLORS), o.color)) for o in scene.objects]
    else:
        raise ValueError(f"unknown edit kind {kind!r}: expected one of {EDIT_KINDS}")
    return EditCase(case_id, kind, scene, targets)


SCENE_GROUPS = ("one object", "two objects, distinct colors", "two objects sharing a color", "two identical objects")


def scene_group(case: EditCase) -> str:
    """The case's scene as one of `SCENE_GROUPS`, for success rates by group: two objects with the same color
    in the source or in the target make the prompt name a color twice, so the model has to bind it to the
    right shape; two objects alike in color and shape in the source leave the prompt unable to say which
    one to edit."""
    objects = case.scene.objects
    if len(objects) == 1:
        return SCENE_GROUPS[0]
    if len(objects) != 2:
        raise ValueError(f"case {case.id}: {len(objects)} objects; scene groups cover one or two")
    (a, b), (ta, tb) = objects, case.targets
    if (a.color, a.shape) == (b.color, b.shape):
        return SCENE_GROUPS[3]
    if a.color == b.color or ta.color == tb.color:
        return SCENE_GROUPS[2]
    return SCENE_GROUPS[1]


BACKGROUND_GROUPS = tuple(f"{bg}, {n}" for bg in BACKGROUND_COLORS for n in ("one object", "two objects"))


def background_group(case: EditCase) -> str:
    """The case's background and object count as one of `BACKGROUND_GROUPS`: the toy model binds a color
    word to the right one of two objects more often on some backgrounds than others (docs/toy.md)."""
    count = len(case.scene.objects)
    if count not in (1, 2):
        raise ValueError(f"case {case.id}: {count} objects; background groups cover one or two")
    return f"{case.scene.background}, {'one object' if count == 1 else 'two objects'}"


def rates_by_group(cases: Sequence[EditCase], successes: Sequence[bool], group: Callable[[EditCase], str] = scene_group,
                   groups: Sequence[str] = SCENE_GROUPS) -> dict[str, dict[str, int]]:
    """Successes and cases per `group` of a case (`scene_group`, or `background_group` with `BACKGROUND_GROUPS`),
    in the order of `groups`, groups without cases left out."""
    counts = {g: {"successes": 0, "cases": 0} for g in groups}
    for case, success in zip(cases, successes, strict=True):
        entry = counts[group(case)]
        entry["cases"] += 1
        entry["successes"] += int(bool(success))
    return {g: c for g, c in counts.items() if c["cases"]}


def subtasks(case: EditCase) -> list[dict[str, Any]]:
    """Ground-A-Score's subtasks: per edited object its source and target phrase and its box (the source
    mask's box grown by `GROUNDING_MARGIN` pixels, as fractions of the image side)."""
    size = case.scene.image.size[0]
    out = []
    for i in case.edited:
        x0, y0, x1, y1 = (int(v) for v in case.scene.boxes[i])
        box = [max(0, x0 - GROUNDING_MARGIN) / size, max(0, y0 - GROUNDING_MARGIN) / size,
               min(size, x1 + GROUNDING_MARGIN) / size, min(size, y1 + GROUNDING_MARGIN) / size]
        out.append({"source": case.scene.objects[i].phrase, "target": case.targets[i].phrase, "box": box})
    return out


def edit_jobs(cases: Sequence[EditCase], methods: Sequence[str], source_dir: Path, overrides: dict[str, dict[str, Any]] | None = None,
              adapter: str | None = None) -> list[dict[str, Any]]:
    """One job per (method, case), id ``<method>__<case id>``; sources saved to `source_dir`; `overrides` per
    method (editor keys); Ground-A-Score jobs get `subtasks`. Each case's seed is its index among the cases of its
    kind, so adding cases (or kinds) leaves the others' noise alone. Paths are absolute (a manifest's relative
    paths are read relative to its own folder)."""
    jobs = []
    seen: Counter[str] = Counter()
    for case in cases:
        i, seen[case.kind] = seen[case.kind], seen[case.kind] + 1
        path = source_dir / f"{case.id}.png"
        if not path.is_file():
            save_image_atomic(case.scene.image, path)
        for method in methods:
            job: dict[str, Any] = {"id": f"{method}__{case.id}", "image": str(path.resolve()), "source_prompt": case.scene.caption,
                                   "target_prompt": case.target_prompt, "method": method, "seed": i}
            if overrides and overrides.get(method):
                job["overrides"] = dict(overrides[method])
            if method == "ground_a_score":
                job["subtasks"] = subtasks(case)
            if adapter:
                job["adapter"] = adapter
            jobs.append(job)
    return jobs


def run_edit_jobs(model: str, jobs: Sequence[dict[str, Any]], out: Path, workers: int = 1,
                  experiment: str | None = None) -> dict[str, dict[str, Any]]:
    """Run `jobs` through the ``edit`` task (a manifest in `out`, outputs in ``out/edits``) on `workers`
    CPU processes; returns each job's record (its ``<id>.json``) by id. A failed job raises the task's error.
    `experiment` (e.g. ``toy_dds``) gives the jobs of its editor that recipe's settings."""
    from dreamsteer.train import edit as edit_task
    from dreamsteer.train.config import compose

    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / "edit_jobs.jsonl"
    manifest.write_text("".join(json.dumps(job) + "\n" for job in jobs), encoding="utf-8")
    edit_dir = out / "edits"
    overrides = [f"model.pretrained={model}", f"jobs={manifest}", f"out={edit_dir}", "progress=false", "logger=none",
                 f"trainer.devices={workers}", *([f"experiment={experiment}"] if experiment else [])]
    edit_task.run(compose("edit", overrides))
    return {job["id"]: json.loads((edit_dir / f"{job['id']}.json").read_text(encoding="utf-8")) for job in jobs}


def edited_image(record: dict[str, Any]) -> Image.Image:
    return Image.open(record["output"]).convert("RGB")


def vae_reconstruction(backbone: Any, image: Image.Image) -> Image.Image:
    """The source encoded and decoded: what an edit that does not move the latent gives."""
    with torch.no_grad():
        x = pil_to_tensor(image)[None].to(backbone.device, backbone.dtype)
        return tensor_to_pil(backbone.decode(backbone.encode_image(x))[0].float().clamp(-1, 1))


def vae_outside_error(backbone: Any, case: EditCase, margin: int = EDIT_MARGIN) -> float:
    """Mean absolute change the VAE alone makes outside the edited objects (encode + decode of the source)."""
    union = case.scene.masks[case.edited].any(axis=0)
    return outside_change(case.scene.image, vae_reconstruction(backbone, case.scene.image), union, margin)


def score_edit(case: EditCase, image: Image.Image) -> dict[str, Any]:
    """`toy_edit_metrics` of an edited image of `case`."""
    return toy_edit_metrics(case.scene.image, image, case.truth)
