"""Every metric over the jobs of one or more edit runs: per job, per run (and method), and run vs run.

`load_models` loads what is available (CLIP, DINO, LPIPS); a metric whose model is missing is
recorded with the reason in `unavailable`, never reported as 0. `evaluate_run` returns a JSON-ready
dict; `compare_runs` pairs runs by job id (e.g. a DreamSteerer baseline edit vs the steered edit).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from dreamsteer.data.images import load_image, resize_and_crop
from dreamsteer.metrics import curves
from dreamsteer.metrics.clip import ClipEmbedder, ModelUnavailableError, clip_i, clip_i_concept, clip_r, clip_t, masked_clip_score, masked_region
from dreamsteer.metrics.dino import DinoEmbedder
from dreamsteer.metrics.image import l1_distance, ms_ssim, ms_ssim_min_size, pil_to_unit, ssim
from dreamsteer.metrics.lpips import LPIPS, load_lpips
from dreamsteer.metrics.runs import EditJob, EditRun, Region
from dreamsteer.metrics.toy_edit import ToyTruthError, is_toy_edit, mean_metrics, toy_edit_metrics, truth_from_prompts


@dataclass(frozen=True)
class MetricInfo:
    label: str
    higher_is_better: bool
    paper: str
    definition: str


# Per-job metrics, in report order. LPIPS entries are added per backbone (lpips_alex, lpips_vgg).
METRICS: dict[str, MetricInfo] = {
    "clip_t": MetricInfo("CLIP-T", True, "LUSD", "cos(CLIP(x), CLIP(y_local)); y_local = local_prompt, else target_prompt"),
    "clip_r": MetricInfo("CLIP-R", True, "LUSD", "cos(CLIP(x), CLIP(y_tgt)) / cos(CLIP(x_src), CLIP(y_tgt))"),
    "clip_i": MetricInfo("CLIP-I", True, "LUSD / DreamSteerer", "cos(CLIP(x), CLIP(x_ref)); x_ref = ground_truth, else the source"),
    "clip_i_concept": MetricInfo("CLIP-I concept", True, "DreamSteerer", "mean_j cos(CLIP(x), CLIP(r_j)) over the concept's reference photos"),
    "dino": MetricInfo("DINO", True, "MagicBrush / LUSD", "cos(DINO(x), DINO(x_ref))"),
    "l1": MetricInfo("L1", False, "LUSD", "mean |x - x_ref|, pixels in [0, 1]"),
    "lpips_alex": MetricInfo("LPIPS (Alex)", False, "DreamSteerer / Ground-A-Score", "LPIPS v0.1, AlexNet, x vs x_ref"),
    "lpips_vgg": MetricInfo("LPIPS (VGG)", False, "DreamSteerer", "LPIPS v0.1, VGG16, x vs x_ref"),
    "ssim": MetricInfo("SSIM", True, "DreamSteerer", "SSIM(x, x_ref), 11x11 Gaussian window, RGB in [0, 1]"),
    "ms_ssim": MetricInfo("MS-SSIM", True, "DreamSteerer", "MS-SSIM(x, x_ref), Wang et al. 2003 weights"),
    "masked_clip": MetricInfo("Masked CLIP", True, "Ground-A-Score", "mean_k 100 max(cos(CLIP(x in region k), CLIP(phrase_k)), 0)"),
}
# Run-level areas (LUSD).
AREAS: dict[str, MetricInfo] = {
    "clip_auc": MetricInfo("CLIP-AUC", True, "LUSD", "integral over k of the ratio of edits with CLIP-R > k"),
    "l1_star": MetricInfo("L1*", False, "LUSD", "integral over k in [1, 1.22] of the mean L1 of edits with CLIP-R > k"),
    "clip_i_star": MetricInfo("CLIP-I*", True, "LUSD", "integral over k in [1, 1.22] of the mean CLIP-I of edits with CLIP-R > k"),
}
CLIP_METRICS = ("clip_t", "clip_r", "clip_i", "clip_i_concept", "masked_clip")


@dataclass
class EvalSettings:
    clip_r_max: float = curves.LUSD_CLIP_R_MAX
    clip_r_step: float = curves.LUSD_CLIP_R_STEP
    background_max: float = curves.LUSD_BACKGROUND_MAX
    min_examples: int = curves.LUSD_MIN_EXAMPLES
    ms_ssim_scales: int = 5
    concept_images: list[Path] = field(default_factory=list)  # DreamSteerer CLIP-I references for every job
    toy_metrics: Optional[bool] = None  # the toy detector's metrics: None = for toy-world edits (metrics.toy_edit.is_toy_edit)

    @property
    def thresholds(self) -> list[float]:
        return curves.clip_r_thresholds(self.clip_r_max, self.clip_r_step)


@dataclass
class Models:
    clip: Optional[ClipEmbedder] = None
    dino: Optional[DinoEmbedder] = None
    lpips: dict[str, LPIPS] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)  # metric -> why it is not computed
    info: dict[str, dict] = field(default_factory=dict)  # model -> {"source", "status", "reason"}


def load_models(
    clip_model: Optional[str],
    dino_model: Optional[str] = None,
    lpips_weights: tuple[str, ...] | list[str] = (),
    device: str = "cpu",
    strict: bool = False,
    batch_size: int = 16,
) -> Models:
    """Load every metric model that is given and loadable; record a reason for each metric left out.

    With `strict`, a model that is given but cannot be loaded raises instead (ModelUnavailableError,
    or FileNotFoundError / LPIPSWeightsError for LPIPS files).
    """
    models = Models()
    models.clip = _load_or_skip(models, "clip", clip_model, lambda: ClipEmbedder.load(clip_model, device, batch_size),
                                CLIP_METRICS, "no clip_model given (set clip_model=<local CLIP folder or hub id>)", strict)
    models.dino = _load_or_skip(models, "dino", dino_model, lambda: DinoEmbedder.load(dino_model, device, batch_size),
                                ("dino",), "no dino_model given (set dino_model=<local DINO ViT folder or hub id>)", strict)
    for path in lpips_weights:
        try:
            net = load_lpips(path, device)
        except (FileNotFoundError, ValueError) as err:
            if strict:
                raise
            models.info[f"lpips:{path}"] = {"source": str(path), "status": "unavailable", "reason": str(err)}
            continue
        models.lpips[f"lpips_{net.net_name}"] = net
        models.info[f"lpips_{net.net_name}"] = {"source": str(path), "status": "loaded"}
    for name in ("lpips_alex", "lpips_vgg"):
        if name not in models.lpips:
            failed = [v["reason"] for k, v in models.info.items() if k.startswith("lpips:")]
            hint = f"; failed: {' | '.join(failed)}" if failed else ""
            models.unavailable[name] = (
                f"no LPIPS {name.split('_')[1]} weights given (lpips_weights=[<file>.safetensors], see docs/evaluation.md){hint}"
            )
    return models


def _load_or_skip(models: "Models", key: str, source: str | None, load: Callable[[], Any], metric_names: Sequence[str],
                  not_given: str, strict: bool) -> Any:
    """The loaded model, or None with the reason recorded in `models.info[key]` and for every metric it serves."""
    if source:
        try:
            loaded = load()
            models.info[key] = {"source": source, "status": "loaded"}
            return loaded
        except ModelUnavailableError as err:
            if strict:
                raise
            models.info[key] = {"source": source, "status": "unavailable", "reason": str(err)}
    else:
        models.info[key] = {"source": None, "status": "not given", "reason": not_given}
    for name in metric_names:
        models.unavailable[name] = models.info[key]["reason"]
    return None


def _fit(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Bring a reference image to the edited image's size (square: resize + center crop, as the editor does)."""
    if image.size == size:
        return image
    if size[0] == size[1]:
        return resize_and_crop(image, size[0])
    return image.resize(size, Image.Resampling.BICUBIC)


def _region_mask(region: Region, size: tuple[int, int]) -> np.ndarray:
    w, h = size
    if region.mask is not None:
        mask = load_image(region.mask, min_side=1).convert("L").resize(size, Image.Resampling.NEAREST)
        return np.asarray(mask) > 127
    x0, y0, x1, y1 = region.box
    if max(region.box) <= 1.0:  # fractions of the image size
        x0, x1, y0, y1 = x0 * w, x1 * w, y0 * h, y1 * h
    mask = np.zeros((h, w), dtype=bool)
    mask[max(0, int(round(y0))) : min(h, int(round(y1))), max(0, int(round(x0))) : min(w, int(round(x1)))] = True
    return mask


class _TextCache:
    def __init__(self, clip: ClipEmbedder):
        self.clip = clip
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        missing = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        if missing:
            for p, e in zip(missing, self.clip.texts(missing)):
                self.cache[p] = e
        return torch.stack([self.cache[p] for p in prompts])


class JobEvaluator:
    """Computes every available metric for one job at a time (caching text and concept embeddings)."""

    def __init__(self, models: Models, settings: EvalSettings):
        self.models = models
        self.settings = settings
        self.texts = _TextCache(models.clip) if models.clip is not None else None
        self.concepts: dict[tuple[str, ...], torch.Tensor] = {}

    def _concept_embeddings(self, paths: list[Path]) -> torch.Tensor:
        key = tuple(str(p) for p in paths)
        if key not in self.concepts:
            self.concepts[key] = self.models.clip.images([load_image(p) for p in paths])
        return self.concepts[key]

    def __call__(self, job: EditJob) -> dict:
        metrics: dict[str, float] = {}
        skipped: dict[str, str] = {}  # metric -> why this job has no value
        notes: list[str] = []
        edited = load_image(job.edited, min_side=1)
        source = _fit(load_image(job.source, min_side=1), edited.size)
        reference = _fit(load_image(job.ground_truth, min_side=1), edited.size) if job.ground_truth else source

        x, r = pil_to_unit(edited), pil_to_unit(reference)
        metrics["l1"] = float(l1_distance(x, r)[0])
        try:
            metrics["ssim"] = float(ssim(x, r)[0])
        except ValueError as err:
            skipped["ssim"] = str(err)
        need = ms_ssim_min_size(self.settings.ms_ssim_scales)
        if min(edited.size) >= need:
            metrics["ms_ssim"] = float(ms_ssim(x, r, scales=self.settings.ms_ssim_scales)[0])
        else:
            skipped["ms_ssim"] = (
                f"image is {edited.size[0]}x{edited.size[1]} px; MS-SSIM with {self.settings.ms_ssim_scales} scales "
                f"needs >= {need} px per side (lower ms_ssim_scales, e.g. 4 for 128 px)"
            )
        for name, net in self.models.lpips.items():
            device = next(net.parameters()).device
            try:
                with torch.no_grad():
                    metrics[name] = float(net((x * 2 - 1).to(device), (r * 2 - 1).to(device))[0])
            except RuntimeError as err:  # an image too small for the backbone's pooling
                skipped[name] = f"LPIPS failed on a {edited.size[0]}x{edited.size[1]} image ({str(err).splitlines()[0]})"

        if self.models.clip is not None:
            self._clip_metrics(job, edited, source, reference, metrics, skipped, notes)
        if self.models.dino is not None:
            e = self.models.dino.images([edited, reference])
            metrics["dino"] = float(e[0] @ e[1])
        reference_kind = "ground_truth" if job.ground_truth else "source"
        result = {"metrics": metrics, "skipped": skipped, "notes": notes, "reference": reference_kind}
        toy = self._toy_metrics(job, source, edited)
        if toy is not None:
            result["toy"] = toy
        return result

    def _toy_metrics(self, job: EditJob, source: Image.Image, edited: Image.Image) -> Optional[dict]:
        """The toy detector's reading of a toy-world edit (`metrics.toy_edit`), or {"unavailable": why} when
        asked for (``toy_metrics=true``) but the edit's truth cannot be read; None when not asked for."""
        wanted = self.settings.toy_metrics
        if wanted is False or (wanted is None and not is_toy_edit(source, job.source_prompt, job.target_prompt)):
            return None
        try:
            return toy_edit_metrics(source, edited, truth_from_prompts(source, job.source_prompt, job.target_prompt))
        except (ToyTruthError, ValueError) as err:
            return {"unavailable": str(err)}

    def _clip_metrics(self, job, edited, source, reference, metrics, skipped, notes) -> None:
        images = [edited, source] + ([reference] if job.ground_truth else [])
        regions = job.regions or ([Region(job.target_prompt, mask=job.mask)] if job.mask else [])
        crops, phrases = [], []
        problems = [r.problem for r in regions if r.problem]
        for region in regions:
            if region.problem:
                continue
            mask = _region_mask(region, edited.size)
            if mask.any():
                crops.append(masked_region(edited, mask))
                phrases.append(region.phrase)
        embeddings = self.models.clip.images(images + crops)
        e_x, e_src = embeddings[0], embeddings[1]
        e_ref = embeddings[2] if job.ground_truth else e_src
        local = job.local_prompt or job.target_prompt
        t_local, t_tgt = self.texts([local, job.target_prompt])
        metrics["clip_t"] = clip_t(e_x, t_local)
        ratio = clip_r(e_x, e_src, t_tgt)
        if ratio is None:
            skipped["clip_r"] = "cos(CLIP(source), CLIP(target_prompt)) <= 0: the ratio is undefined (counts as not successful)"
        else:
            metrics["clip_r"] = ratio
        metrics["clip_i"] = clip_i(e_x, e_ref)
        concept = job.reference_images or self.settings.concept_images
        if concept:
            metrics["clip_i_concept"] = clip_i_concept(e_x, self._concept_embeddings(list(concept)))
        else:
            skipped["clip_i_concept"] = "no concept reference photos (job 'reference_images' or concept_images=<folder>)"
        if crops:
            metrics["masked_clip"] = masked_clip_score(embeddings[len(images) :], self.texts(phrases))
        else:
            skipped["masked_clip"] = "job has no edit region (no 'subtasks' and no 'mask', or all regions empty)"
        if problems:  # the score (if any) covers the usable regions only
            notes.extend(f"masked CLIP: {p}" for p in problems)


def _summary(values: list[float]) -> dict:
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std()), "count": int(arr.size)}


def aggregate(jobs: dict[str, dict], metric_names: list[str], unavailable: dict[str, str], total: int, settings: EvalSettings) -> dict:
    """Mean / std / count per metric, LUSD's curves and areas over a set of evaluated jobs.

    `total` is the number of attempted edits (finished + failed): the success rate's denominator.
    """
    out: dict = {"metrics": {}, "curves": {}, "areas": {}}
    for name in metric_names:
        values = [j["metrics"][name] for j in jobs.values() if name in j["metrics"]]
        if values:
            out["metrics"][name] = _summary(values)
        elif name in unavailable:
            out["metrics"][name] = {"mean": None, "reason": unavailable[name]}
        else:
            reasons = sorted({j["skipped"].get(name, "") for j in jobs.values()} - {""})
            out["metrics"][name] = {"mean": None, "reason": "; ".join(reasons) or "no job could be scored"}
    if "clip_r" in unavailable:
        for name in AREAS:
            out["areas"][name] = {"value": None, "reason": unavailable["clip_r"]}
        return out
    grid = settings.thresholds
    clip_r_values = [j["metrics"].get("clip_r") for j in jobs.values()]
    out["curves"]["thresholds"] = [round(k, 6) for k in grid]
    out["curves"]["success_rate"] = curves.success_rate_curve(clip_r_values, grid, total) if total else []
    out["areas"]["clip_auc"] = curves.clip_auc(clip_r_values, grid, total).to_dict() if total else {"value": None, "reason": "no edits"}
    out["curves"]["passing"] = [sum(1 for r in clip_r_values if r is not None and r > k) for k in grid]
    for name, metric in (("l1_star", "l1"), ("clip_i_star", "clip_i")):
        values = [j["metrics"].get(metric) for j in jobs.values()]
        out["curves"][f"mean_{metric}"] = curves.conditional_mean_curve(clip_r_values, values, grid)[0]
        result = curves.conditional_area(clip_r_values, values, grid, settings.background_max, settings.min_examples, AREAS[name].label)
        out["areas"][name] = result.to_dict()
    return out


def evaluate_run(run: EditRun, models: Models, settings: EvalSettings, evaluator: Optional[JobEvaluator] = None,
                 progress: bool = True) -> dict:
    """Evaluate every finished job of `run`; a JSON-ready dict with per-job values and aggregates."""
    evaluator = evaluator or JobEvaluator(models, settings)
    metric_names = list(METRICS)
    jobs: dict[str, dict] = {}
    for job in tqdm(run.jobs.values(), desc=f"evaluate {run.label}", disable=not progress or len(run.jobs) < 8):
        result = evaluator(job)
        jobs[job.id] = {
            "method": job.method,
            "source_prompt": job.source_prompt,
            "target_prompt": job.target_prompt,
            "local_prompt": job.local_prompt,
            "edited": str(job.edited),
            "source": str(job.source),
            "mask": str(job.mask) if job.mask else None,
            "ground_truth": str(job.ground_truth) if job.ground_truth else None,
            **result,
        }
    total = len(jobs) + len(run.failures)
    summary = aggregate(jobs, metric_names, models.unavailable, total, settings)
    methods = list(dict.fromkeys(j["method"] for j in jobs.values()))
    out = {
        "label": run.label,
        "dir": str(run.directory),
        "num_jobs": len(jobs),
        "num_failed": len(run.failures),
        "failures": dict(run.failures),
        "methods": methods,
        "unavailable": dict(models.unavailable),
        "aggregate": summary["metrics"],
        "areas": summary["areas"],
        "curves": summary["curves"],
        "jobs": jobs,
    }
    toy = [j["toy"] for j in jobs.values() if "toy" in j and "unavailable" not in j["toy"]]
    if toy:
        out["toy"] = mean_metrics(toy)
    if len(methods) > 1:  # failures carry no method: per-method rates use finished jobs only
        out["by_method"] = {}
        for method in methods:
            subset = {k: v for k, v in jobs.items() if v["method"] == method}
            part = aggregate(subset, metric_names, models.unavailable, len(subset), settings)
            out["by_method"][method] = {"num_jobs": len(subset), "aggregate": part["metrics"], "areas": part["areas"], "curves": part["curves"]}
    return out


def compare_runs(results: list[dict]) -> list[dict]:
    """Pair every run with the first (the baseline) by job id: per metric, means over the jobs both
    scored, the mean difference (other - baseline) and how many jobs got better."""
    if len(results) < 2:
        return []
    base = results[0]
    comparisons = []
    for other in results[1:]:
        common = [i for i in base["jobs"] if i in other["jobs"]]
        table = {}
        for name, info in METRICS.items():
            pairs = [
                (base["jobs"][i]["metrics"][name], other["jobs"][i]["metrics"][name])
                for i in common
                if name in base["jobs"][i]["metrics"] and name in other["jobs"][i]["metrics"]
            ]
            if not pairs:
                continue
            a, b = np.asarray(pairs, dtype=np.float64).T
            better = (b > a) if info.higher_is_better else (b < a)
            table[name] = {
                "count": len(pairs),
                "baseline_mean": float(a.mean()),
                "other_mean": float(b.mean()),
                "mean_delta": float((b - a).mean()),
                "improved": int(better.sum()),
            }
        comparisons.append(
            {
                "baseline": base["label"],
                "other": other["label"],
                "common_jobs": common,
                "only_baseline": [i for i in base["jobs"] if i not in other["jobs"]],
                "only_other": [i for i in other["jobs"] if i not in base["jobs"]],
                "metrics": table,
            }
        )
    return comparisons


def json_safe(value):
    """The same structure with NaN / inf floats replaced by None (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
