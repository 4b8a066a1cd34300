"""`python -m train edit`: score-distillation editing of one image, or of a manifest of jobs on N processes.

One edit::

    python -m train edit image=cat.png source_prompt="a cat" target_prompt="a cat wearing a hat" editor=lusd

Jobs (Lightning predict; each job exactly once; resumable; failures in failures.jsonl and exit status 1)::

    python -m train edit jobs=jobs.jsonl out=runs/edit trainer.devices=4

Everything is validated before any compute: the editor config, every manifest line (ids, prompts,
boxes, mask sizes, methods, overrides) and every adapter folder (adapter.json, base model).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dreamsteer.data.manifest import EditJob, ManifestError, check_mask_size, parse_job, read_manifest
from dreamsteer.distill.config import METHODS, SCHEMAS, EditorConfig, method_defaults
from dreamsteer.distill.editor import EditorConfigError, check_editor
from dreamsteer.train.config import (ConfigError, LoggerConfig, ModelConfig, TaskFailed, TrainerConfig, check_common, check_output_dir,
                                     number_problem, output_dir, resolve_device, validate)
from dreamsteer.train.lock import is_launch_rank_zero, output_lock


@dataclass
class GroundingConfig:
    model: Optional[str] = None
    threshold: float = 0.3
    text_threshold: float = 0.25


@dataclass
class EditTaskConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    editor: Any = None  # validated against the method's schema (distill.config.SCHEMAS)
    grounding: GroundingConfig = field(default_factory=GroundingConfig)
    image: Optional[str] = None
    source_prompt: Optional[str] = None
    target_prompt: Optional[str] = None
    subtasks: Optional[List[Any]] = None
    id: str = "edit"
    adapter: Optional[str] = None
    seed: int = 0
    jobs: Optional[str] = None
    out: Optional[str] = None
    output_dir: Optional[str] = None
    progress: bool = True


def editor_from(values: dict[str, Any], label: str = "config key 'editor", num_train_timesteps: int = 1000) -> EditorConfig:
    """Validate editor `values` against their method's schema; errors read ``<label>.<key>': <why>``."""
    method = values.get("method")
    if method not in SCHEMAS:
        raise ConfigError(f"{label}.method': unknown method {method!r}, expected one of {list(METHODS)}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(SCHEMAS[method]), values)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(f"{label}.{key}': {getattr(err, 'msg', str(err)).splitlines()[0]}") from None
    problem = number_problem(OmegaConf.to_container(merged))
    if problem:
        raise ConfigError(f"{label}.{problem[0]}': {problem[1]}")
    cfg = OmegaConf.to_object(merged)
    try:
        check_editor(cfg, num_train_timesteps)
    except EditorConfigError as err:
        raise ConfigError(f"{label}.{err.key}': {err.why}") from None
    return cfg


def job_editor(job: EditJob, cli: dict[str, Any], base_dir: Path) -> EditorConfig:
    """The job's editor config: the CLI editor (same method) or the method's defaults, plus its overrides."""
    base = dict(cli) if job.method == cli["method"] else method_defaults(job.method)
    values = {**base, **job.overrides, "method": job.method}
    if values.get("subject_mask") not in (None, "auto"):
        key = "overrides.subject_mask" if "subject_mask" in job.overrides else "editor.subject_mask"
        path = Path(values["subject_mask"]).expanduser()
        path = path if path.is_absolute() else (base_dir / path).resolve()
        if not path.is_file():
            raise job.error(key, f"mask image not found: {path}")
        check_mask_size(job, str(path), key)
        values["subject_mask"] = str(path)
    try:
        return editor_from(values, f"{job.where} (job {job.id!r}): field 'overrides")
    except ConfigError as err:
        raise ManifestError(str(err)) from None


class EditJobsFailed(TaskFailed):
    """Some jobs of a manifest failed (the others are done); `summary` is what `run_jobs` would return."""

    def __init__(self, message: str, summary: dict[str, Any]):
        super().__init__(message)
        self.summary = summary


class AdapterChecker:
    """Checks adapter folders before compute: adapter.json present and trained on the configured model."""

    def __init__(self, model: ModelConfig):
        self.model = model
        self._fingerprint: dict[str, Any] | None = None
        self._checked: dict[str, None] = {}

    def fingerprint(self) -> dict[str, Any]:
        if self._fingerprint is None:
            from dreamsteer.diffusion.adapters import model_fingerprint
            from dreamsteer.diffusion.backbone import load_backbone

            m = self.model
            self._fingerprint = model_fingerprint(load_backbone(m.pretrained, m.dtype, "cpu", m.cache_dir, m.single_file_config))
        return self._fingerprint

    def check(self, job: EditJob) -> None:
        if job.method in ("dds_s", "dds_sm") and job.adapter is None:
            raise job.error("adapter", f"method {job.method} compares the personalized model with the pre-trained one; "
                            "give an exported adapter folder")
        if job.adapter is None or job.adapter in self._checked:
            return
        from dreamsteer.checkpoints.adapter_io import check_adapter_folder
        from dreamsteer.diffusion.adapters import fingerprints_match

        try:
            manifest = check_adapter_folder(job.adapter)
        except (FileNotFoundError, ValueError) as err:
            raise job.error("adapter", str(err)) from None
        if manifest.get("base_model") != self.model.pretrained and not fingerprints_match(self.fingerprint(), manifest["base_model_fingerprint"]):
            raise job.error("adapter", f"{job.adapter} was trained on base model {manifest.get('base_model')!r}, "
                            f"not on the configured model {self.model.pretrained!r} (model.pretrained)")
        self._checked[job.adapter] = None


def run(cfg: DictConfig) -> dict[str, Any]:
    from dreamsteer.diffusion.backbone import set_progress_bars

    cfg = validate(cfg, EditTaskConfig)
    set_progress_bars(cfg.progress)
    check_common(cfg)
    if cfg.editor is None:
        raise ConfigError("config key 'editor': choose a method, e.g. editor=dds")
    cli_editor = OmegaConf.to_container(cfg.editor, resolve=True)
    editor_from(cli_editor)
    if cfg.out and cfg.output_dir and Path(cfg.out) != Path(cfg.output_dir):
        raise ConfigError("config keys 'out' and 'output_dir' name different folders; set one of them")
    if cfg.out:
        check_output_dir(cfg.out, "out")
        cfg.output_dir = cfg.out
    if cfg.jobs:
        return run_jobs(cfg, cli_editor)
    return run_single(cfg, cli_editor)


def _model_dict(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg.model, resolve=True)


def run_single(cfg: DictConfig, cli_editor: dict[str, Any]) -> dict[str, Any]:
    from dreamsteer.lit_modules.edit import EditRunner, write_job_outputs

    for key in ("image", "target_prompt"):
        if not cfg.get(key):
            raise ConfigError(f"config key '{key}': required for a single edit (or give jobs=<manifest.jsonl>)")
    entry = {"id": cfg.id, "image": cfg.image, "source_prompt": cfg.source_prompt or "", "target_prompt": cfg.target_prompt,
             "method": cli_editor["method"], "adapter": cfg.adapter, "seed": cfg.seed,
             "subtasks": OmegaConf.to_container(cfg.subtasks, resolve=True) if cfg.subtasks else None}
    job = parse_job(entry, "config", Path.cwd(), METHODS, cli_editor["method"], cfg.seed)
    editor = job_editor(job, cli_editor, Path.cwd())
    AdapterChecker(cfg.model).check(job)
    out = output_dir(cfg)
    with output_lock(out, "edit"):
        runner = EditRunner(_model_dict(cfg), resolve_device(cfg.model.device), OmegaConf.to_container(cfg.grounding))
        outcome = runner.run(job, editor, progress=cfg.progress)
        record = write_job_outputs(out, outcome)
        _log_tensorboard(cfg, out, outcome)
        print(f"edited image: {record['output']}  (record: {out / (job.id + '.json')})")
    return record


def _log_tensorboard(cfg: DictConfig, out: Path, outcome) -> None:
    from dreamsteer.train.logs import summary_writer

    writer = summary_writer(cfg, out)
    if writer is None:
        return
    import numpy as np

    from dreamsteer.data.images import tensor_to_pil

    for i, step in enumerate(outcome.result.trace["steps"]):
        writer.add_scalar("edit/raw_std", step["raw_std"], i)
    pair = np.concatenate([np.asarray(outcome.source), np.asarray(tensor_to_pil(outcome.result.image))], axis=1)
    writer.add_image(f"edit/{outcome.job.id}", pair, 0, dataformats="HWC")
    writer.close()


def _world(cfg: DictConfig) -> int:
    devices = cfg.trainer.devices
    count = len(devices) if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices) else (
        int(devices) if str(devices).lstrip("-").isdigit() else 1)
    return max(count, 1) * int(cfg.trainer.num_nodes)


def _launched_externally() -> bool:
    """torchrun / SLURM / another launcher already started one process per rank."""
    return any(k in os.environ for k in ("LOCAL_RANK", "TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "LSB_JOBID"))


def _strategy(cfg: DictConfig) -> str:
    """`auto` with several processes and no launcher -> ``ddp_spawn`` (works from the CLI, scripts and tests);
    an explicit ``ddp`` re-launches ``python -m train edit`` per rank; torchrun / SLURM start the ranks."""
    if _launched_externally():
        return cfg.trainer.strategy
    if cfg.trainer.strategy == "auto" and _world(cfg) > 1:
        return "ddp_spawn"
    return cfg.trainer.strategy


def run_jobs(cfg: DictConfig, cli_editor: dict[str, Any]) -> dict[str, Any]:
    """Run every unfinished job of the manifest; the summary, or EditJobsFailed (carrying it) when any job failed."""
    import lightning
    from torch.utils.data import DataLoader

    from dreamsteer.lit_modules.edit import (EditJobWriter, EditPredictModule, JobDataset, collate_one, is_finished, merge_failures,
                                  remove_partial_writes)

    if _launched_externally() and not cfg.output_dir:
        raise ConfigError("config key 'out': set it when ranks are started by torchrun / SLURM (each rank would "
                          "otherwise get its own time-stamped Hydra folder)")
    manifest = Path(cfg.jobs).expanduser().resolve()
    jobs = read_manifest(manifest, METHODS, cli_editor["method"], cfg.seed)
    adapters = AdapterChecker(cfg.model)
    items = []
    for job in jobs:
        if job.adapter is None and cfg.adapter:
            job.adapter = str(Path(cfg.adapter).expanduser().resolve())
        editor = job_editor(job, cli_editor, manifest.parent)
        adapters.check(job)
        items.append((job, editor))
    out = output_dir(cfg)
    with output_lock(out, "edit jobs") if is_launch_rank_zero() else contextlib.nullcontext():
        if is_launch_rank_zero():
            remove_partial_writes(out)
        todo = [(j, e) for j, e in items if not is_finished(out, j.id)]
        todo.sort(key=lambda item: item[0].adapter or "")  # jobs sharing an adapter run back to back (one model load)
        if is_launch_rank_zero():
            print(f"edit jobs: {len(items)} in {manifest.name}, {len(items) - len(todo)} already done, {len(todo)} to run -> {out}")
        if todo:
            trainer = lightning.Trainer(
                accelerator=cfg.trainer.accelerator,
                devices=cfg.trainer.devices,
                num_nodes=cfg.trainer.num_nodes,
                strategy=_strategy(cfg),
                precision=cfg.trainer.precision,
                logger=False,
                callbacks=[EditJobWriter(out, cfg.progress)],
                enable_progress_bar=False,
                enable_checkpointing=False,
                enable_model_summary=False,
                inference_mode=False,  # CDS / Ground-A-Score back-propagate through the UNet
            )
            module = EditPredictModule(_model_dict(cfg), OmegaConf.to_container(cfg.grounding), cfg.progress)
            loader = DataLoader(JobDataset(todo, trainer.world_size), batch_size=1, shuffle=False, collate_fn=collate_one)
            trainer.predict(module, dataloaders=loader, return_predictions=False)
        done = [j.id for j in jobs if is_finished(out, j.id)]
        failures = merge_failures(out)
        summary = {"out": str(out), "jobs": len(jobs), "done": done, "failures": failures}
        if is_launch_rank_zero():
            print(f"edit jobs: {len(done)}/{len(jobs)} done, {len(failures)} failed" + (f" (see {out / 'failures.jsonl'})" if failures else ""))
        if failures:
            raise EditJobsFailed(f"{len(failures)} of {len(jobs)} edit jobs failed ({', '.join(f['id'] for f in failures[:3])}"
                                 f"{', ...' if len(failures) > 3 else ''}); the reasons are in {out / 'failures.jsonl'}, "
                                 "a re-run retries only those", summary)
        return summary
