"""`python -m train export ckpt=<checkpoint file or run folder> [dir=...]`

Rebuilds the base model and adapter from the checkpoint's own config, loads its trainable state
and writes the adapter folder (the same formats as the end of `personalize`). Returns the folder.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from dreamsteer.checkpoints.adapter_io import prepare_export_target
from dreamsteer.checkpoints.lightning import read_trimmed_checkpoint
from dreamsteer.train.config import ConfigError, check_output_dir, output_dir, validate
from dreamsteer.train.lock import output_lock


@dataclass
class ExportTaskConfig:
    ckpt: str = "???"
    dir: Optional[str] = None  # default: <output_dir>/adapter
    pretrained: Optional[str] = None  # override the base model recorded in the checkpoint (e.g. moved folder)
    weights: Optional[str] = None  # ema | raw; default: the run's ema.export (raw without EMA)
    output_dir: Optional[str] = None
    progress: bool = True  # false: no model-loading bars


def export_checkpoint(module: Any, checkpoint: dict[str, Any], target: Path) -> Path:
    """Load a trimmed checkpoint's trainable state into `module` (a personalize module built from the same
    config) and export it to `target`, with the checkpoint's step and resume history in adapter.json."""
    module.backbone.adapter.load_trainable_state_dict(module.backbone, checkpoint["state_dict"])
    module.restore_ema(checkpoint, f"checkpoint {checkpoint.get('path', '')}")
    module.resumes = list(checkpoint.get("resumes", []))
    return module.export(target, training_steps=int(checkpoint.get("global_step", 0)))


def checkpoint_run_folder(path: Path) -> Path:
    """``<run>/checkpoints/x.ckpt`` -> ``<run>``; a checkpoint elsewhere -> its folder."""
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def run(cfg: DictConfig) -> Path:
    from dreamsteer.data.subject import concept_folders, resolve_concepts
    from dreamsteer.diffusion.backbone import set_progress_bars
    from dreamsteer.lit_modules.personalize import MODULES
    from dreamsteer.train.personalize import load_base

    cfg = validate(cfg, ExportTaskConfig)
    set_progress_bars(cfg.progress)
    if cfg.ckpt in (None, "", "???"):
        raise ConfigError("config key 'ckpt': set it to a checkpoint file or a personalize run folder")
    if cfg.output_dir:
        check_output_dir(cfg.output_dir)
    checkpoint = read_trimmed_checkpoint(cfg.ckpt)
    config = checkpoint["hyper_parameters"]["config"]
    if cfg.pretrained:
        config["model"]["pretrained"] = cfg.pretrained
    method = config["method"]["name"]
    ema_cfg = config.setdefault("ema", {})
    if cfg.weights is not None:
        if cfg.weights not in ("ema", "raw"):
            raise ConfigError(f"config key 'weights': {cfg.weights!r} is not one of ['ema', 'raw']")
        if cfg.weights == "ema" and not ema_cfg.get("enabled"):
            raise ConfigError(f"config key 'weights': ema, but checkpoint {checkpoint['path']} was trained with ema.enabled=false")
        ema_cfg["export"] = cfg.weights
    if method not in MODULES:
        raise ConfigError(f"checkpoint {checkpoint['path']}: unknown method {method!r}")
    source = Path(checkpoint["path"])
    target = Path(cfg.dir).expanduser() if cfg.dir else output_dir(cfg) / "adapter"
    prepare_export_target(target, {
        "the checkpoint": source, "its checkpoint folder": source.parent, "its run folder": checkpoint_run_folder(source),
        **concept_folders(resolve_concepts(OmegaConf.create(config.get("data", {})))),
    })
    with output_lock(target.parent, "export"):
        backbone = load_base(config["model"], config.get("pivot"), checkpoint_run_folder(source))  # with the run's pivot words
        module = MODULES[method](config, backbone)
        path = export_checkpoint(module, checkpoint, target)
    print(f"exported {method} adapter (step {checkpoint.get('global_step')}) from {checkpoint['path']} to {path}")
    return path
