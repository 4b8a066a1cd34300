"""Edit-job manifests: JSONL, one job per line, validated as a whole before any compute.

A job::

    {"id": "cat-hat", "image": "photos/cat.png", "source_prompt": "a photo of a cat",
     "target_prompt": "a photo of a cat wearing a hat", "method": "lusd", "adapter": null, "seed": 0,
     "overrides": {"steps": 200},
     "subtasks": [{"source": "cat", "target": "dog", "box": [0.1, 0.2, 0.6, 0.9], "preserve": false},
                  {"source": "sofa", "target": "red sofa", "mask": "masks/sofa.png"}]}

Relative paths are relative to the manifest's folder. Ids name the output files, so they are
restricted to ``[A-Za-z0-9._-]`` (starting with a letter or digit): an output can never land outside
the output folder. Blank lines and lines starting with ``#`` are skipped.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection

from dreamsteer.data.images import ImageLoadError, image_size

MAX_SEED = 2**63 - 1  # torch generators take 64-bit seeds
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
JOB_KEYS = {"id", "image", "source_prompt", "target_prompt", "method", "adapter", "subtasks", "seed", "overrides"}
SUBTASK_KEYS = {"source", "target", "box", "mask", "preserve", "phrase"}


class ManifestError(ValueError):
    """A manifest entry that cannot be used; the message names the manifest line, the job and the field."""


@dataclass
class SubtaskSpec:
    """A Ground-A-Score subtask as written in the manifest (region: box, mask image, or detected phrase)."""

    source: str
    target: str
    box: list[float] | None = None
    mask: str | None = None
    preserve: bool = False
    phrase: str | None = None  # what the detector looks for when there is neither box nor mask (default: source)


@dataclass
class EditJob:
    id: str
    image: str
    source_prompt: str
    target_prompt: str
    method: str
    adapter: str | None = None
    seed: int = 0
    overrides: dict[str, Any] = field(default_factory=dict)
    subtasks: list[SubtaskSpec] = field(default_factory=list)
    where: str = ""  # "manifest.jsonl line 3" (for messages)

    def error(self, key: str, why: str) -> ManifestError:
        return ManifestError(f"{self.where} (job {self.id!r}): field '{key}': {why}")


def check_id(job_id: Any, where: str) -> str:
    if not isinstance(job_id, str) or not ID_PATTERN.match(job_id) or job_id in (".", ".."):
        raise ManifestError(f"{where}: field 'id': {job_id!r} is not a valid id (letters, digits, '.', '_', '-'; "
                            "starting with a letter or digit; at most 128 characters)")
    return job_id


def _resolve(path: Any, base: Path, what: str, where: str) -> str:
    if not isinstance(path, str) or not path.strip():
        raise ManifestError(f"{where}: field '{what}': expected a file path, got {path!r}")
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _check_image(path: str, what: str, where: str) -> tuple[int, int]:
    """The image's size from its header: a missing file, a folder, a non-image or a decompression bomb fails here."""
    try:
        return image_size(path)
    except ImageLoadError as err:
        raise ManifestError(f"{where}: field '{what}': {err}") from None


def parse_job(obj: Any, where: str, base: Path, methods: Collection[str], default_method: str, default_seed: int = 0) -> EditJob:
    """One manifest entry -> EditJob, checking every field that can be checked without reading images."""
    if not isinstance(obj, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    job_id = check_id(obj.get("id"), where)
    label = f"{where} (job {job_id!r})"
    unknown = sorted(set(obj) - JOB_KEYS)
    if unknown:
        raise ManifestError(f"{label}: field '{unknown[0]}': unknown field (fields: {sorted(JOB_KEYS)})")
    method = obj.get("method") or default_method
    if method not in methods:
        raise ManifestError(f"{label}: field 'method': unknown method {method!r}, expected one of {sorted(methods)}")
    prompts = {}
    for key in ("source_prompt", "target_prompt"):
        value = obj.get(key)
        if value is None or (isinstance(value, str) and not value.strip() and not (key == "source_prompt" and method == "sds")):
            raise ManifestError(f"{label}: field '{key}': missing or empty prompt")
        if not isinstance(value, str):
            raise ManifestError(f"{label}: field '{key}': expected a string, got {value!r}")
        prompts[key] = value
    seed = obj.get("seed", default_seed)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        raise ManifestError(f"{label}: field 'seed': expected an integer in [0, 2**63 - 1], got {seed!r}")
    overrides = obj.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise ManifestError(f"{label}: field 'overrides': expected an object of editor keys, got {overrides!r}")
    if "method" in overrides:
        raise ManifestError(f"{label}: field 'overrides.method': set the job's 'method' field instead")
    adapter = obj.get("adapter")
    if adapter is not None:
        adapter = _resolve(adapter, base, "adapter", label)
    subtasks = [_parse_subtask(s, i, base, label) for i, s in enumerate(obj.get("subtasks") or [])]
    if subtasks and method != "ground_a_score":
        raise ManifestError(f"{label}: field 'subtasks': only method ground_a_score uses subtasks (method is {method})")
    image = _resolve(obj.get("image"), base, "image", label)
    _check_image(image, "image", label)
    return EditJob(job_id, image, prompts["source_prompt"], prompts["target_prompt"], method, adapter, seed,
                   dict(overrides), subtasks, where)


def _parse_subtask(obj: Any, i: int, base: Path, label: str) -> SubtaskSpec:
    key = f"subtasks[{i}]"
    if not isinstance(obj, dict):
        raise ManifestError(f"{label}: field '{key}': expected an object, got {obj!r}")
    unknown = sorted(set(obj) - SUBTASK_KEYS)
    if unknown:
        raise ManifestError(f"{label}: field '{key}.{unknown[0]}': unknown field (fields: {sorted(SUBTASK_KEYS)})")
    for name in ("source", "target"):
        if not isinstance(obj.get(name), str) or not obj[name].strip():
            raise ManifestError(f"{label}: field '{key}.{name}': missing or empty phrase")
    if obj.get("box") is not None and obj.get("mask") is not None:
        raise ManifestError(f"{label}: field '{key}': give a box or a mask, not both")
    box = _check_box(obj["box"], f"{label}: field '{key}.box'") if obj.get("box") is not None else None
    mask = _resolve(obj["mask"], base, f"{key}.mask", label) if obj.get("mask") is not None else None
    if mask is not None:
        _check_image(mask, f"{key}.mask", label)
    preserve = obj.get("preserve", False)
    if not isinstance(preserve, bool):
        raise ManifestError(f"{label}: field '{key}.preserve': expected true or false, got {preserve!r}")
    phrase = obj.get("phrase")
    if phrase is not None and (not isinstance(phrase, str) or not phrase.strip()):
        raise ManifestError(f"{label}: field '{key}.phrase': expected a non-empty string")
    return SubtaskSpec(obj["source"], obj["target"], box, mask, preserve, phrase)


def _check_box(box: Any, what: str) -> list[float]:
    """A normalized xyxy box: four numbers in [0, 1] with x0 < x1 and y0 < y1."""
    if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
        raise ManifestError(f"{what}: expected [x0, y0, x1, y1] (four numbers), got {box!r}")
    values = [float(v) for v in box]
    if any(not 0.0 <= v <= 1.0 for v in values):
        raise ManifestError(f"{what}: coordinates must lie in [0, 1] (normalized xyxy), got {values}")
    if values[2] <= values[0] or values[3] <= values[1]:
        raise ManifestError(f"{what}: empty box {values} (needs x0 < x1 and y0 < y1)")
    return values


def check_mask_size(job: EditJob, mask: str, key: str) -> None:
    """A mask image must have the source image's size (both are resized and cropped alike); only headers are read."""
    size = _check_image(job.image, "image", f"{job.where} (job {job.id!r})")
    msize = _check_image(mask, key, f"{job.where} (job {job.id!r})")
    if msize != size:
        raise job.error(key, f"mask is {msize[0]}x{msize[1]} but the image is {size[0]}x{size[1]}; "
                        "a mask must have the source image's size")


def check_mask_sizes(job: EditJob) -> None:
    """Every subtask mask of `job` has the source image's size."""
    for i, sub in enumerate(job.subtasks):
        if sub.mask is not None:
            check_mask_size(job, sub.mask, f"subtasks[{i}].mask")


def read_manifest(path: str | Path, methods: Collection[str], default_method: str, default_seed: int = 0) -> list[EditJob]:
    """Parse and validate every job of a JSONL manifest (ids unique); raises ManifestError on the first problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path}: file not found")
    jobs: list[EditJob] = []
    seen: dict[str, str] = {}
    for n, raw in enumerate(path.read_bytes().splitlines(), start=1):
        where = f"manifest {path.name} line {n}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ManifestError(f"{where}: not UTF-8 text (a manifest is a JSONL text file; is {path} binary?)") from None
        if "\x00" in line:
            raise ManifestError(f"{where}: contains NUL bytes (a manifest is a JSONL text file; is {path} binary?)")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ManifestError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
        job = parse_job(obj, where, path.parent.resolve(), methods, default_method, default_seed)
        if job.id in seen:
            raise ManifestError(f"{where}: field 'id': duplicate id {job.id!r} (first at {seen[job.id]})")
        seen[job.id] = where
        check_mask_sizes(job)
        jobs.append(job)
    if not jobs:
        raise ManifestError(f"manifest {path}: no jobs")
    return jobs
