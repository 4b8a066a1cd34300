"""Config schemas shared by the tasks, validation with clear errors, and composition for tests.

Each task validates its composed Hydra config against a dataclass schema at start, so an unknown
key or a wrong type fails before any compute, with the key named.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


class ConfigError(ValueError):
    """A config value that cannot be used; the message names the key."""


@dataclass
class ModelConfig:
    pretrained: str = "tiny"
    dtype: str = "fp32"  # fp32 | fp16 | bf16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    cache_dir: Optional[str] = None
    single_file_config: Optional[str] = None


@dataclass
class TrainerConfig:
    """The Lightning Trainer arguments tasks expose (passed through to `lightning.Trainer`)."""

    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"


@dataclass
class LoggerConfig:
    name: str = "tensorboard"  # tensorboard | none


def validate(cfg: DictConfig, schema: type) -> DictConfig:
    """Merge `cfg` onto the structured `schema`: unknown keys and wrong types raise ConfigError."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        message = getattr(err, "msg", str(err)).splitlines()[0]
        raise ConfigError(f"config key '{key}': {message}") from None
    return merged


def check_choice(cfg: DictConfig, key: str, choices: Sequence[str]) -> None:
    value = OmegaConf.select(cfg, key)
    if value not in choices:
        raise ConfigError(f"config key '{key}': {value!r} is not one of {list(choices)}")


def check_common(cfg: DictConfig) -> None:
    """Checks every task shares: the model's dtype and the logger name."""
    if "model" in cfg:
        check_choice(cfg, "model.dtype", ["fp32", "fp16", "bf16"])
    if "logger" in cfg:
        check_choice(cfg, "logger.name", ["tensorboard", "none"])


def resolve_device(name: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def compose(task: str, overrides: Sequence[str] = ()) -> DictConfig:
    """Compose a task's config as the CLI would (for tests and for `demo`, which chains tasks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=task, overrides=list(overrides))


def output_dir(cfg: DictConfig) -> Path:
    """The task's output folder: `output_dir` when set, else the Hydra run folder."""
    if cfg.get("output_dir"):
        path = Path(cfg.output_dir)
    else:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            raise ConfigError("config key 'output_dir': must be set when the task is not launched through `python -m train`")
        path = Path(HydraConfig.get().runtime.output_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path
