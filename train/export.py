"""`python -m train export ckpt=<checkpoint file or run folder> [dir=...] [a1111=true]`

Rebuilds the base model and adapter from the checkpoint's own config, loads its trainable state
and writes the adapter folder (the same formats as the end of `personalize`). Returns the folder.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

from dreamsteer.checkpoints.lightning import read_trimmed_checkpoint
from dreamsteer.train.config import ConfigError, check_output_dir, output_dir, validate


@dataclass
class ExportTaskConfig:
    ckpt: str = "???"
    dir: Optional[str] = None  # default: <output_dir>/adapter
    a1111: bool = False
    pretrained: Optional[str] = None  # override the base model recorded in the checkpoint (e.g. moved folder)
    output_dir: Optional[str] = None


def run(cfg: DictConfig) -> Path:
    from dreamsteer.lit_modules.personalize import MODULES

    cfg = validate(cfg, ExportTaskConfig)
    if cfg.ckpt in (None, "", "???"):
        raise ConfigError("config key 'ckpt': set it to a checkpoint file or a personalize run folder")
    if cfg.output_dir:
        check_output_dir(cfg.output_dir)
    checkpoint = read_trimmed_checkpoint(cfg.ckpt)
    config = checkpoint["hyper_parameters"]["config"]
    if cfg.pretrained:
        config["model"]["pretrained"] = cfg.pretrained
    method = config["method"]["name"]
    if method not in MODULES:
        raise ConfigError(f"checkpoint {checkpoint['path']}: unknown method {method!r}")
    module = MODULES[method](config)
    backbone = module.backbone
    backbone.adapter.load_trainable_state_dict(backbone, checkpoint["state_dict"])
    target = Path(cfg.dir) if cfg.dir else output_dir(cfg) / "adapter"
    path = module.export(target, a1111=cfg.a1111, training_steps=int(checkpoint.get("global_step", 0)))
    print(f"exported {method} adapter (step {checkpoint.get('global_step')}) from {checkpoint['path']} to {path}")
    return path
