"""Edit jobs with Lightning: a thin predict module over the framework-free editor (`distill.editor`).

- `EditRunner` (no Lightning): loads the model (and each job's adapter, cached), prepares a job's
  inputs (source image at the model resolution, subtask regions, subject mask) and runs the editor.
- `write_job_outputs`: ``<id>_source.png``, ``<id>_mask.png`` (when the method has a mask),
  ``<id>.png`` and last ``<id>.json`` — each written atomically; ``<id>.json`` marks the job done.
- `EditPredictModule` + `EditJobWriter`: ``trainer.predict(..., return_predictions=False)`` over the
  jobs under DDP (Lightning's unrepeated distributed sampler runs each job exactly once); a failing
  job is recorded in ``failures/<id>.json`` and the others go on; at the end rank 0 merges those
  records into ``failures.jsonl``.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from dreamsteer.data.files import atomic_write, is_orphan_temp, write_json_atomic
from dreamsteer.data.images import (
    load_image,
    pil_to_tensor,
    resize_and_crop,
    save_image_atomic,
    tensor_to_pil,
)
from dreamsteer.data.manifest import EditJob
from dreamsteer.diffusion.backbone import set_progress_bars
from dreamsteer.distill.config import EditorConfig
from dreamsteer.distill.editor import EditResult, edit
from dreamsteer.distill.masks import box_region, mask_region
from dreamsteer.distill.methods import Subtask

FAILURES_DIR = "failures"
FAILURES_FILE = "failures.jsonl"


class JobInputError(ValueError):
    """A job input that fails at run time (bad mask image, phrase not detected); names the job and field."""


@dataclass
class JobOutcome:
    job: EditJob
    cfg: EditorConfig
    result: EditResult
    source: Image.Image  # the source at the model resolution
    timings: dict[str, float] = field(default_factory=dict)
    adapter_manifest: dict[str, Any] | None = None
    boxes: list[list[int]] = field(default_factory=list)


def is_finished(out_dir: Path, job_id: str) -> bool:
    """A job is done when its record (written last) and its image exist."""
    return (out_dir / f"{job_id}.json").is_file() and (out_dir / f"{job_id}.png").is_file()


def load_mask_image(path: str, size: int) -> torch.Tensor:
    """A mask image (any mode; > 50% gray = inside), resized and center-cropped like the source: ``[H, W]`` in [0, 1]."""
    image = resize_and_crop(load_image(path, min_side=1).convert("L"), size)
    return pil_to_tensor(image.convert("RGB"))[0].add(1).div(2)


class EditRunner:
    """Runs edit jobs on one device; keeps the loaded model between jobs that share an adapter."""

    def __init__(self, model: dict[str, Any], device: str | torch.device = "cpu", grounding: dict[str, Any] | None = None):
        self.model = dict(model)
        self.device = torch.device(device)
        self.grounding = dict(grounding or {})
        self._backbone = None
        self._adapter: str | None = None
        self._manifest: dict[str, Any] | None = None

    def backbone(self, adapter: str | None):
        """The base model with `adapter` attached (reloaded when the adapter changes: adapters do not detach)."""
        if self._backbone is None or adapter != self._adapter:
            from dreamsteer.diffusion.backbone import load_backbone

            m = self.model
            bb = load_backbone(m["pretrained"], m.get("dtype", "fp32"), self.device, m.get("cache_dir"), m.get("single_file_config"))
            manifest = None
            if adapter is not None:
                from dreamsteer.checkpoints import load_adapter

                manifest = load_adapter(bb, adapter)
            self._backbone, self._adapter, self._manifest = bb, adapter, manifest
        return self._backbone, self._manifest

    def regions(self, job: EditJob, source: Image.Image, latent: tuple[int, int]) -> list[Subtask]:
        subtasks: list[Subtask] = []
        pending = [(i, s) for i, s in enumerate(job.subtasks) if s.box is None and s.mask is None]
        detected: dict[int, list[float] | None] = {}
        if pending:
            model_path = self.grounding.get("model")
            if not model_path:
                raise JobInputError(f"job {job.id!r}: field 'subtasks[{pending[0][0]}]': no box or mask, and no grounding.model "
                                    "(a local zero-shot detector folder) to find it")
            from dreamsteer.distill.grounding import detect_boxes

            boxes = detect_boxes(source, [s.phrase or s.source for _, s in pending], model_path,
                                 self.grounding.get("threshold", 0.3), self.grounding.get("text_threshold", 0.25), device=self.device)
            detected = {i: box for (i, _), box in zip(pending, boxes)}
        for i, spec in enumerate(job.subtasks):
            what = f"job {job.id!r}: field 'subtasks[{i}]'"
            try:
                if spec.box is not None:
                    region = box_region(spec.box, latent, what)
                elif spec.mask is not None:
                    region = mask_region(load_mask_image(spec.mask, source.size[0]), latent, what)
                else:
                    box = detected[i]
                    if box is None:
                        raise JobInputError(f"{what}: the detector found no box for {spec.phrase or spec.source!r}")
                    region = box_region(box, latent, what)
            except ValueError as err:
                raise JobInputError(str(err)) from None
            subtasks.append(Subtask(spec.source, spec.target, region, spec.preserve))
        return subtasks

    def run(self, job: EditJob, cfg: EditorConfig, progress: bool = True, desc: str | None = None) -> JobOutcome:
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        bb, manifest = self.backbone(job.adapter)
        timings["model_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        source = resize_and_crop(load_image(job.image), bb.resolution)
        image = pil_to_tensor(source)
        latent = (bb.resolution // bb.vae_scale_factor,) * 2
        subtasks = self.regions(job, source, latent)
        subject = None
        subject_cfg = getattr(cfg, "subject_mask", None)
        if subject_cfg not in (None, "auto"):
            subject = mask_region(load_mask_image(subject_cfg, bb.resolution), latent, f"job {job.id!r}: field 'subject_mask'").mask
        if subject_cfg == "auto" and not cfg.subject_token and manifest:
            token = class_word(manifest, job.source_prompt)
            if token:
                cfg = replace(cfg, subject_token=token)
        timings["inputs_s"] = time.perf_counter() - t1
        result = edit(bb, image, job.source_prompt, job.target_prompt, cfg, seed=job.seed, subtasks=subtasks,
                      subject_mask=subject, progress=progress, desc=desc or job.id)
        timings["edit_s"] = result.trace.get("total_s", 0.0)
        timings["total_s"] = time.perf_counter() - t0
        return JobOutcome(job, cfg, result, source, timings, manifest, [list(s.region.box) for s in subtasks])


def class_word(manifest: dict[str, Any], source_prompt: str) -> str | None:
    """The subject word for DDS-SM's mask from the adapter's class prompt ("a photo of a cat" -> "cat"),
    when it occurs in the source prompt."""
    from dreamsteer.distill.prompts import is_noun, words

    class_prompt = manifest.get("class_prompt") or ""
    nouns = [w for w in words(class_prompt) if is_noun(w)]
    return nouns[-1] if nouns and nouns[-1] in words(source_prompt) else None


def write_job_outputs(out_dir: Path, outcome: JobOutcome) -> dict[str, Any]:
    """Write a job's files atomically; ``<id>.json`` last (it marks the job done). Returns the record."""
    job, result = outcome.job, outcome.result
    out_dir.mkdir(parents=True, exist_ok=True)
    source_path = save_image_atomic(outcome.source, out_dir / f"{job.id}_source.png")
    mask_path = None
    if result.mask is not None:
        size = outcome.source.size
        mask = torch.nn.functional.interpolate(result.mask.float(), size=(size[1], size[0]), mode="nearest")[0, 0]
        mask_img = Image.fromarray((mask.clamp(0, 1) * 255).round().to(torch.uint8).numpy(), mode="L")
        mask_path = save_image_atomic(mask_img, out_dir / f"{job.id}_mask.png")
    image_path = save_image_atomic(tensor_to_pil(result.image), out_dir / f"{job.id}.png")
    record = {
        "id": job.id,
        "image": job.image,
        "source_prompt": job.source_prompt,
        "target_prompt": job.target_prompt,
        "method": outcome.cfg.method,
        "adapter": job.adapter,
        "seed": job.seed,
        "output": str(image_path.resolve()),
        "mask": str(mask_path.resolve()) if mask_path else None,
        "source_resized": str(source_path.resolve()),
        "subtasks": [asdict(s) for s in job.subtasks],
        "subtask_boxes": outcome.boxes,  # latent-pixel xyxy of each subtask region as used (after detection)
        "params": asdict(outcome.cfg),
        "timings": outcome.timings,
        "adapter_method": (outcome.adapter_manifest or {}).get("method"),
        "trace": result.trace,
    }
    write_json_atomic(record, out_dir / f"{job.id}.json")
    stale = out_dir / FAILURES_DIR / f"{job.id}.json"
    if stale.exists():
        stale.unlink()
    return record


def write_failure(out_dir: Path, job_id: str, error: BaseException, trace: str | None = None) -> dict[str, Any]:
    record = {"id": job_id, "error": f"{type(error).__name__}: {error}"}
    if trace:
        record["traceback"] = trace
    (out_dir / FAILURES_DIR).mkdir(parents=True, exist_ok=True)
    write_json_atomic(record, out_dir / FAILURES_DIR / f"{job_id}.json")
    return record


def remove_partial_writes(out_dir: Path) -> int:
    """Delete temp files a killed run left behind (``*.tmp``: never taken as outputs, only clutter);
    a temp file whose writer still runs is not ours to delete."""
    removed = 0
    for folder in (out_dir, out_dir / FAILURES_DIR):
        for path in folder.glob("*.tmp") if folder.is_dir() else ():
            if is_orphan_temp(path):
                path.unlink(missing_ok=True)
                removed += 1
    return removed


def merge_failures(out_dir: Path) -> list[dict[str, Any]]:
    """Collect ``failures/<id>.json`` of jobs still unfinished into ``failures.jsonl`` (atomic; removed when empty)."""
    folder = out_dir / FAILURES_DIR
    records = []
    if folder.is_dir():
        for path in sorted(folder.glob("*.json")):
            record = json.loads(path.read_text(encoding="utf-8"))
            if not is_finished(out_dir, record["id"]):
                records.append(record)
    target = out_dir / FAILURES_FILE
    if records:
        with atomic_write(target, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    elif target.exists():
        target.unlink()
    return records


class JobDataset(Dataset):
    """The jobs still to run; each item is ``(job, editor config)``.

    Padded with ``None`` items (skipped) up to `world_size` entries: Lightning's unrepeated distributed
    sampler needs at least one item per rank.
    """

    def __init__(self, items: Sequence[tuple[EditJob, EditorConfig]], world_size: int = 1):
        self.items: list[tuple[EditJob, EditorConfig] | None] = list(items)
        self.items += [None] * max(0, world_size - len(self.items))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[EditJob, EditorConfig] | None:
        return self.items[index]


def collate_one(batch: list[tuple[EditJob, EditorConfig] | None]) -> tuple[EditJob, EditorConfig] | None:
    return batch[0]


def stop_with_parent(parent: int, poll_s: float = 1.0) -> None:
    """Exit this process as soon as its `parent` is gone: without it, a ``kill -9`` of the main process of
    a ``ddp_spawn`` run leaves the workers editing to the end. A daemon thread polls ``os.getppid()``,
    which changes when the parent dies and this process is re-parented."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="stop-with-parent", daemon=True).start()


class EditPredictModule(LightningModule):
    """``predict_step`` runs one job; a failure is returned as a record instead of stopping the run."""

    def __init__(self, model: dict[str, Any], grounding: dict[str, Any] | None = None, progress: bool = True):
        super().__init__()
        self.model_cfg = dict(model)
        self.grounding = dict(grounding or {})
        self.progress = progress
        self._runner: EditRunner | None = None

    def setup(self, stage: str) -> None:
        parent = multiprocessing.parent_process()
        if parent is not None:  # a ddp_spawn worker: stop with the main process, and show bars as it would
            stop_with_parent(parent.pid)
            set_progress_bars(self.progress)

    def predict_step(self, batch: tuple[EditJob, EditorConfig] | None, batch_idx: int) -> dict[str, Any] | None:
        if batch is None:  # padding for a rank without a job
            return None
        job, cfg = batch
        if self._runner is None:
            self._runner = EditRunner(self.model_cfg, self.device, self.grounding)
        try:
            outcome = self._runner.run(job, cfg, progress=self.progress and self.trainer.world_size == 1,
                                       desc=f"rank {self.global_rank} {job.id}")
            return {"job": job, "outcome": outcome}
        except Exception as err:  # one bad job must not stop the others; the record names it
            return {"job": job, "error": err, "traceback": traceback.format_exc()}


class EditJobWriter(BasePredictionWriter):
    """Writes each job's outputs (or failure record) as soon as it finishes; merges failures at the end."""

    def __init__(self, out_dir: str | Path, progress: bool = True):
        super().__init__(write_interval="batch")
        self.out_dir = Path(out_dir)
        self.progress = progress
        self._bar: tqdm | None = None

    def on_predict_start(self, trainer, pl_module) -> None:
        loaders = trainer.predict_dataloaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        per_rank = sum(sum(item is not None for item in dl.dataset.items[trainer.global_rank::trainer.world_size])
                       if isinstance(dl.dataset, JobDataset) else len(dl) for dl in loaders)
        self._bar = tqdm(total=per_rank, desc=f"edit jobs, rank {trainer.global_rank}/{trainer.world_size}",
                         position=trainer.global_rank, unit="job", disable=not self.progress)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx) -> None:
        if prediction is None:
            return
        job = prediction["job"]
        if "error" in prediction:
            write_failure(self.out_dir, job.id, prediction["error"], prediction.get("traceback"))
            status = f"FAILED: {prediction['error']}"
        else:
            record = write_job_outputs(self.out_dir, prediction["outcome"])
            status = f"done in {record['timings']['total_s']:.1f}s"
        if self._bar is not None:
            self._bar.update(1)
            self._bar.write(f"[rank {trainer.global_rank}] job {job.id}: {status}")

    def on_predict_end(self, trainer, pl_module) -> None:
        if self._bar is not None:
            self._bar.close()
        trainer.strategy.barrier("edit-jobs-done")
        if trainer.is_global_zero:
            merge_failures(self.out_dir)
