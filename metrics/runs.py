"""Reading an edit run folder (the editor's output contract) for evaluation.

An edit run folder holds, per finished job, `<id>.png` (the edited image) and `<id>.json` with at
least `id`, `image` (source path), `source_prompt`, `target_prompt`, `method`, `adapter`, `seed`,
`mask` (`<id>_mask.png` or null), `params`, `timings`, `source_resized` (`<id>_source.png`: the
source at the model resolution), and `failures.jsonl` (one `{"id", "error"}` object per failed job).

Optional keys the evaluation also reads from `<id>.json`:
- `local_prompt`: the text of the local change (LUSD's CLIP-T uses MagicBrush's local description);
- `ground_truth`: a reference edit (MagicBrush-style); L1 / CLIP-I / DINO / LPIPS / SSIM then compare against it;
- `reference_images`: a folder or list of the personal concept's photos (DreamSteerer's CLIP-I);
- `subtasks` (or `params.subtasks`): Ground-A-Score regions, each with a target phrase (`target` or `target_phrase`) and
  a region (`mask`: a mask image path, or `box`: [x0, y0, x1, y1], fractions of the image size when
  all are <= 1, else pixels of the edited image).
Paths may be absolute, relative to the run folder, or relative to the working directory.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

REQUIRED_KEYS = ("id", "image", "source_prompt", "target_prompt", "method")
NOT_JOBS = {"metrics.json"}  # our own output, should a user evaluate into the run folder


class RunFormatError(ValueError):
    """An edit run folder that does not follow the output contract; the message names the file and key."""


@dataclass
class Region:
    """One region whose content should match `phrase` (a Ground-A-Score subtask or a job's edit mask).

    `problem` says why a subtask has no usable region (e.g. it was found by a detector at edit
    time and the record holds neither box nor mask); such regions are left out of the masked CLIP score.
    """

    phrase: str
    mask: Optional[Path] = None
    box: Optional[list[float]] = None
    problem: Optional[str] = None


@dataclass
class EditJob:
    id: str
    json_path: Path
    edited: Path
    source: Path
    source_is_resized: bool
    method: str
    source_prompt: str
    target_prompt: str
    local_prompt: Optional[str] = None
    mask: Optional[Path] = None
    ground_truth: Optional[Path] = None
    reference_images: list[Path] = field(default_factory=list)
    regions: list[Region] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)


@dataclass
class EditRun:
    directory: Path
    label: str
    jobs: dict[str, EditJob]
    failures: dict[str, str]  # id -> error, for jobs without outputs


def resolve_path(value: str, run_dir: Path) -> Optional[Path]:
    """An existing file/folder for `value`: absolute, else under the run folder, else under the working directory."""
    path = Path(value)
    candidates = [path] if path.is_absolute() else [run_dir / path, Path.cwd() / path]
    return next((p for p in candidates if p.exists()), None)


def _require_path(record: dict, key: str, run_dir: Path, job_file: Path) -> Path:
    value = record.get(key)
    if not isinstance(value, str) or not value:
        raise RunFormatError(f"edit job {job_file}: key '{key}' must be a path, got {value!r}")
    path = resolve_path(value, run_dir)
    if path is None:
        raise RunFormatError(f"edit job {job_file}: '{key}' = {value!r} not found (absolute, under {run_dir}, or the working directory)")
    return path


def _regions(record: dict, run_dir: Path, job_file: Path) -> list[Region]:
    params = record.get("params") if isinstance(record.get("params"), dict) else {}
    subtasks = record.get("subtasks") or params.get("subtasks") or []  # top level, or copied into params
    if not isinstance(subtasks, list):
        raise RunFormatError(f"edit job {job_file}: 'subtasks' must be a list")
    regions = []
    for i, sub in enumerate(subtasks):
        where = f"edit job {job_file}: subtasks[{i}]"
        if not isinstance(sub, dict):
            raise RunFormatError(f"{where} must be an object")
        phrase = sub.get("target") or sub.get("target_phrase")
        if not isinstance(phrase, str) or not phrase:
            raise RunFormatError(f"{where}: needs a target phrase ('target' or 'target_phrase')")
        if sub.get("mask"):
            path = resolve_path(str(sub["mask"]), run_dir)
            problem = None if path is not None else f"subtasks[{i}] mask {sub['mask']!r} not found"
            regions.append(Region(phrase, mask=path, problem=problem))
        elif sub.get("box") is not None:
            box = sub["box"]
            if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
                raise RunFormatError(f"{where}: 'box' must be [x0, y0, x1, y1], got {box!r}")
            if not (box[2] > box[0] and box[3] > box[1]):
                raise RunFormatError(f"{where}: 'box' {box!r} is empty (need x1 > x0 and y1 > y0)")
            regions.append(Region(phrase, box=[float(v) for v in box]))
        else:
            regions.append(Region(phrase, problem=f"subtasks[{i}] ({phrase!r}) has neither 'box' nor 'mask' in the record"))
    return regions


def _reference_images(record: dict, run_dir: Path, job_file: Path) -> list[Path]:
    from dreamsteer.data.images import list_images

    value = record.get("reference_images")
    if not value:
        return []
    values = value if isinstance(value, list) else [value]
    paths: list[Path] = []
    for v in values:
        path = _require_path({"reference_images": v}, "reference_images", run_dir, job_file)
        paths += list_images(path) if path.is_dir() else [path]
    if not paths:
        raise RunFormatError(f"edit job {job_file}: 'reference_images' {value!r} holds no images")
    return paths


def load_job(job_file: Path, run_dir: Path) -> EditJob:
    """Parse and check one `<id>.json`; every referenced file must exist."""
    try:
        record = json.loads(job_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise RunFormatError(f"edit job {job_file}: not valid JSON ({err})") from err
    if not isinstance(record, dict):
        raise RunFormatError(f"edit job {job_file}: expected a JSON object")
    for key in REQUIRED_KEYS:
        if key not in record:
            raise RunFormatError(f"edit job {job_file}: missing key '{key}'")
    if str(record["id"]) != job_file.stem:
        raise RunFormatError(f"edit job {job_file}: 'id' is {record['id']!r}, but the file is named {job_file.name}")
    for key in ("source_prompt", "target_prompt", "method"):
        if not isinstance(record[key], str):
            raise RunFormatError(f"edit job {job_file}: '{key}' must be a string")
    if record.get("source_resized"):
        source, resized = _require_path(record, "source_resized", run_dir, job_file), True
    else:
        source, resized = _require_path(record, "image", run_dir, job_file), False
    mask = _require_path(record, "mask", run_dir, job_file) if record.get("mask") else None
    ground_truth = _require_path(record, "ground_truth", run_dir, job_file) if record.get("ground_truth") else None
    local_prompt = record.get("local_prompt")
    if local_prompt is not None and not isinstance(local_prompt, str):
        raise RunFormatError(f"edit job {job_file}: 'local_prompt' must be a string")
    return EditJob(
        id=job_file.stem,
        json_path=job_file,
        edited=job_file.with_suffix(".png"),
        source=source,
        source_is_resized=resized,
        method=record["method"],
        source_prompt=record["source_prompt"],
        target_prompt=record["target_prompt"],
        local_prompt=local_prompt or None,
        mask=mask,
        ground_truth=ground_truth,
        reference_images=_reference_images(record, run_dir, job_file),
        regions=_regions(record, run_dir, job_file),
        record=record,
    )


def _failures(run_dir: Path) -> dict[str, str]:
    path = run_dir / "failures.jsonl"
    if not path.is_file():
        return {}
    failures: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise RunFormatError(f"{path}: line {number} is not valid JSON ({err})") from err
        if not isinstance(entry, dict) or "id" not in entry:
            raise RunFormatError(f"{path}: line {number} needs an object with an 'id'")
        failures[str(entry["id"])] = str(entry.get("error", ""))
    return failures


def load_run(directory: str | Path, label: Optional[str] = None) -> EditRun:
    """Read an edit run folder: every `<id>.json` that has its `<id>.png`, plus `failures.jsonl`.

    A job that failed once and later finished (a resumed run) counts as finished. Raises
    FileNotFoundError for a missing folder, RunFormatError for a folder with neither jobs nor failures.
    """
    run_dir = Path(directory)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"edit run {run_dir}: folder not found")
    jobs: dict[str, EditJob] = {}
    for job_file in sorted(run_dir.glob("*.json")):
        if job_file.name in NOT_JOBS or not job_file.with_suffix(".png").is_file():
            continue
        job = load_job(job_file, run_dir)
        jobs[job.id] = job
    failures = {k: v for k, v in _failures(run_dir).items() if k not in jobs}
    if not jobs and not failures:
        raise RunFormatError(f"edit run {run_dir}: no edit jobs found (expected <id>.png + <id>.json pairs or failures.jsonl)")
    return EditRun(run_dir, label or run_dir.name, jobs, failures)
