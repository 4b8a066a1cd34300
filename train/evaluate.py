"""`python -m train evaluate`: the papers' metrics over edit runs -> metrics.json + a self-contained report.html."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from dreamsteer.train.config import ConfigError, LoggerConfig, check_common, check_device, output_dir, resolve_device, validate
from dreamsteer.train.logs import summary_writer


@dataclass
class EvaluateConfig:
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    run: Optional[str] = None
    runs: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    clip_model: Optional[str] = None
    dino_model: Optional[str] = None
    lpips_weights: list[str] = field(default_factory=list)
    concept_images: Optional[str] = None
    strict_models: bool = False
    device: str = "auto"
    batch_size: int = 16
    clip_r_max: float = 1.40
    clip_r_step: float = 0.01
    background_max: float = 1.22
    min_examples: int = 30
    ms_ssim_scales: int = 5
    toy_metrics: Optional[bool] = None  # the toy detector's metrics (metrics/toy_edit.py); null: for toy-world edits
    report: bool = True
    embed_images: bool = True
    thumbnail_size: int = 256
    report_max_jobs: Optional[int] = None
    output_dir: Optional[str] = None
    progress: bool = True


def _check(cfg: DictConfig) -> list[str]:
    """Every config check that needs no model: returns the run folders to evaluate."""
    if cfg.run and cfg.runs:
        raise ConfigError("config keys 'run' and 'runs': give one run folder with run=..., or several with runs=[...], not both")
    folders = [cfg.run] if cfg.run else list(cfg.runs)
    if not folders:
        raise ConfigError("config key 'run': required (an edit run folder), or runs=[dirA,dirB] to compare runs")
    if cfg.labels and len(cfg.labels) != len(folders):
        raise ConfigError(f"config key 'labels': {len(cfg.labels)} labels for {len(folders)} runs")
    labels = list(cfg.labels) or [Path(f).name for f in folders]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"config key 'labels': run labels must be unique, got {labels} (set labels=[...])")
    if cfg.batch_size < 1 or cfg.thumbnail_size < 16:
        raise ConfigError("config keys 'batch_size' (>= 1) and 'thumbnail_size' (>= 16)")
    if not 1 <= cfg.ms_ssim_scales <= 5:
        raise ConfigError(f"config key 'ms_ssim_scales': must be in 1..5, got {cfg.ms_ssim_scales}")
    if cfg.clip_r_step <= 0 or cfg.clip_r_max <= 1.0:
        raise ConfigError("config keys 'clip_r_step' (> 0) and 'clip_r_max' (> 1): the CLIP-R grid starts at 1")
    if not 1.0 + cfg.clip_r_step <= cfg.background_max + 1e-9 <= cfg.clip_r_max + 2e-9:
        raise ConfigError(f"config key 'background_max': must lie in [1 + clip_r_step, clip_r_max], got {cfg.background_max}")
    if cfg.concept_images and not Path(cfg.concept_images).is_dir():
        raise FileNotFoundError(f"config key 'concept_images': folder {cfg.concept_images} not found")
    if cfg.report_max_jobs is not None and cfg.report_max_jobs < 0:
        raise ConfigError("config key 'report_max_jobs': must be >= 0 or null")
    check_device(cfg.device, "device")
    return folders


def _print_summary(results: dict) -> None:
    from dreamsteer.metrics.evaluator import AREAS, METRICS
    from dreamsteer.metrics.toy_edit import toy_summary_line

    for run in results["runs"]:
        print(f"[{run['label']}] {run['num_jobs']} jobs, {run['num_failed']} failed")
        for name, entry in run["aggregate"].items():
            if entry.get("mean") is not None:
                print(f"  {METRICS[name].label:<16} {entry['mean']:.4f}  (n={entry['count']})")
        for name, entry in run["areas"].items():
            if entry.get("value") is not None:
                print(f"  {AREAS[name].label:<16} {entry['value']:.4f}")
        if "toy" in run:
            print("  toy detector     " + toy_summary_line(run["toy"]))
    for name, reason in results["runs"][0]["unavailable"].items():
        print(f"  skipped {name}: {reason}", file=sys.stderr)


def run(cfg: DictConfig) -> dict:
    """Evaluate the run folder(s), write `metrics.json` (and `report.html`), return the results dict."""
    from dreamsteer.data.images import list_images
    from dreamsteer.metrics.evaluator import EvalSettings, JobEvaluator, compare_runs, evaluate_run, json_safe, load_models
    from dreamsteer.metrics.report import write_report, write_text_atomic
    from dreamsteer.metrics.runs import load_run

    cfg = validate(cfg, EvaluateConfig)
    check_common(cfg)
    folders = _check(cfg)
    labels = list(cfg.labels) or [Path(f).name for f in folders]
    edit_runs = [load_run(folder, label) for folder, label in zip(folders, labels)]  # format errors before any model loads
    concept = list_images(cfg.concept_images) if cfg.concept_images else []
    out = output_dir(cfg)

    settings = EvalSettings(cfg.clip_r_max, cfg.clip_r_step, cfg.background_max, cfg.min_examples, cfg.ms_ssim_scales, concept, cfg.toy_metrics)
    device = resolve_device(cfg.device)
    models = load_models(cfg.clip_model, cfg.dino_model, list(cfg.lpips_weights), device, cfg.strict_models, cfg.batch_size)
    evaluator = JobEvaluator(models, settings)
    run_results = [evaluate_run(edit_run, models, settings, evaluator, cfg.progress) for edit_run in edit_runs]
    results = json_safe(
        {
            "created": datetime.now().isoformat(timespec="seconds"),
            "settings": {
                "clip_r_max": cfg.clip_r_max,
                "clip_r_step": cfg.clip_r_step,
                "background_max": cfg.background_max,
                "min_examples": cfg.min_examples,
                "ms_ssim_scales": cfg.ms_ssim_scales,
                "toy_metrics": cfg.toy_metrics,
                "device": device,
            },
            "models": models.info,
            "config": OmegaConf.to_container(cfg, resolve=True),
            "runs": run_results,
            "comparison": compare_runs(run_results),
        }
    )
    write_text_atomic(json.dumps(results, indent=2, allow_nan=False), out / "metrics.json")
    if cfg.report:
        path = write_report(results, out / "report.html", cfg.embed_images, cfg.thumbnail_size, cfg.report_max_jobs)
        print(f"wrote {path}")
    writer = summary_writer(cfg, out)
    if writer is not None:
        for r in results["runs"]:
            for name, entry in r["aggregate"].items():
                if entry.get("mean") is not None:
                    writer.add_scalar(f"{r['label']}/{name}", entry["mean"], 0)
            for name, entry in r["areas"].items():
                if entry.get("value") is not None:
                    writer.add_scalar(f"{r['label']}/{name}", entry["value"], 0)
            for k, rate in zip(r["curves"].get("thresholds", []), r["curves"].get("success_rate", [])):
                writer.add_scalar(f"{r['label']}/success_rate_vs_clip_r_x100", rate, round(k * 100))
        writer.close()
    _print_summary(results)
    print(f"wrote {out / 'metrics.json'}")
    return results
