"""Config schemas shared by the tasks, validation with clear errors, and composition for tests.

Each task validates its composed Hydra config against a dataclass schema at start, so an unknown
key or a wrong type fails before any compute, with the key named.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"



class ConfigError(ValueError):
    """A config value that cannot be used; the message names the key."""


class TaskFailed(Exception):
    """A task ran to its end but part of its work failed (e.g. some edit jobs); the message says what and
    where the details are. The CLI prints it as one line and exits with status 1."""


# No config number of this project is meaningful beyond these: larger values are typos (lr=1e300)
# or overflow what torch accepts (seeds are 64-bit).
MAX_FLOAT = 1e6
MAX_INT = 2**63 - 1
DEVICE_TYPES = ("cpu", "cuda", "mps")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


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
    name: str = "tensorboard"  # tensorboard | none; Lightning tasks also csv | wandb
    project: str = "dreamsteer"  # wandb: the project name
    offline: bool = True  # wandb: write the run locally (upload later with `wandb sync`)


LIGHTNING_LOGGERS = ("tensorboard", "csv", "wandb", "none")


def validate(cfg: DictConfig, schema: type) -> DictConfig:
    """Merge `cfg` onto the structured `schema`: unknown keys and wrong types raise ConfigError."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        message = getattr(err, "msg", str(err)).splitlines()[0]
        raise ConfigError(f"config key '{key}': {message}") from None
    problem = number_problem(OmegaConf.to_container(merged, resolve=False))
    if problem:
        raise ConfigError(f"config key '{problem[0]}': {problem[1]}")
    return merged


def number_problem(cfg: Any, prefix: str = "") -> tuple[str, str] | None:
    """The first number of the plain container `cfg` that no key can use, as (key, why): floats must be
    finite and within +-MAX_FLOAT, ints fit in 64 bits. None when all are fine."""
    items = cfg.items() if isinstance(cfg, dict) else enumerate(cfg) if isinstance(cfg, list) else ()
    for key, value in items:
        name = f"{prefix}[{key}]" if isinstance(cfg, list) else f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, float) and not (math.isfinite(value) and abs(value) <= MAX_FLOAT):
            return name, f"{value} is not a usable number (it must be finite and within +-{MAX_FLOAT:g})"
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
            return name, f"{value} does not fit in 64 bits"
        problem = number_problem(value, name)
        if problem:
            return problem
    return None


def check_choice(cfg: DictConfig, key: str, choices: Sequence[str]) -> None:
    value = OmegaConf.select(cfg, key)
    if value not in choices:
        raise ConfigError(f"config key '{key}': {value!r} is not one of {list(choices)}")


def check_common(cfg: DictConfig, loggers: Sequence[str] = ("tensorboard", "none")) -> None:
    """Checks every task shares: the output folder, the model's dtype and device, the trainer's devices, the logger name (one of `loggers`; wandb installed)."""
    if cfg.get("output_dir"):
        check_output_dir(cfg.output_dir)
    if "model" in cfg:
        check_choice(cfg, "model.dtype", ["fp32", "fp16", "bf16"])
        check_device(cfg.model.device, "model.device")
    if "trainer" in cfg:
        check_trainer_devices(cfg.trainer)
    if "logger" in cfg:
        check_choice(cfg, "logger.name", loggers)
        if cfg.logger.name == "wandb":
            import importlib.util

            if importlib.util.find_spec("wandb") is None:
                raise ConfigError("config key 'logger.name': wandb is not installed (pip install 'dreamsteer[wandb]', or pip install wandb)")


def check_output_dir(path: str | os.PathLike, key: str = "output_dir") -> None:
    """Refuse an output folder that is a file, lies under a file, or cannot be written; creates nothing."""
    target = Path(path).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise ConfigError(f"config key '{key}': {path} is a file, not a folder")
    existing = target
    while not existing.is_dir():
        if existing.exists() or existing.is_symlink():
            raise ConfigError(f"config key '{key}': {path} lies under {existing}, which is not a folder")
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"config key '{key}': cannot write in {existing} (no permission, or a read-only file system)")


def run_folder(*candidates: str | None) -> str:
    """Hydra's run folder (conf/hydra/default.yaml): the first candidate (output_dir, out) that is set and usable,
    else the last (the time-stamped default). An unusable output_dir is left to the task's own check, which
    names the key, instead of failing inside Hydra with a traceback."""
    *chosen, default = candidates
    for path in chosen:
        if path in (None, ""):
            continue
        try:
            check_output_dir(path)
        except ConfigError:
            break
        return str(path)
    return str(default)


# Run folders are `${run_folder:...}` and end in `${pid:}`: two runs started in the same second get different folders.
OmegaConf.register_new_resolver("run_folder", run_folder, replace=True)
OmegaConf.register_new_resolver("pid", os.getpid, replace=True)


def check_device(name: str, key: str) -> None:
    """`name` is 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', and that device exists here."""
    import torch

    if name == "auto":
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        raise ConfigError(f"config key '{key}': {name!r} is not a device (auto, cpu, cuda, cuda:N or mps)")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"config key '{key}': {name!r} but no CUDA device is visible (torch {torch.__version__}); use {key}=cpu or auto")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"config key '{key}': {name!r} but only {count} CUDA device(s) are visible (cuda:0..cuda:{count - 1})")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"config key '{key}': 'mps' is not available on this machine; use {key}=cpu or auto")


def check_trainer_devices(trainer: DictConfig) -> None:
    """trainer.accelerator is one we support (and present); trainer.devices is a count >= 1, -1 (all), 'auto',
    or a list of device indices."""
    import torch

    accelerator = trainer.get("accelerator", "auto")
    if accelerator not in ACCELERATORS:
        raise ConfigError(f"config key 'trainer.accelerator': {accelerator!r} is not one of {list(ACCELERATORS)}")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"config key 'trainer.accelerator': {accelerator!r} but no CUDA device is visible; use trainer=cpu or trainer.accelerator=auto")
    devices = trainer.get("devices", 1)
    why = "expected a count >= 1, -1 (all devices), 'auto', or a list of device indices like [0,1]"
    if OmegaConf.is_list(devices) or isinstance(devices, (list, tuple)):
        indices = list(devices)
        if not indices or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices) or len(set(indices)) != len(indices):
            raise ConfigError(f"config key 'trainer.devices': {indices} {why}")
        return
    text = str(devices).strip()
    if text == "auto":
        return
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if "," in text:  # Lightning reads "0,1" as device indices
        valid = bool(parts) and all(p.isdigit() for p in parts)
    else:
        valid = isinstance(devices, (int, str)) and not isinstance(devices, bool) and (text == "-1" or (text.isdigit() and int(text) >= 1))
    if not valid:
        raise ConfigError(f"config key 'trainer.devices': {devices!r}: {why}")


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


def model_recipe(model: str, method: str) -> str | None:
    """The experiment ``<model>_<method>`` (a model's own recipe for a personalization method or an
    editor, ``conf/experiment/``) when there is one, else None."""
    name = f"{model}_{method}".replace("-", "_")
    if not re.fullmatch(r"\w+", name):  # a folder or hub id has no recipe here
        return None
    return name if (CONF_DIR / "experiment" / f"{name}.yaml").is_file() else None


def recipe_overrides(model: str, method: str, recipes_of: str | None = None) -> list[str]:
    """The `personalize` overrides that train `method` on `model` with the model's own recipe
    (`model_recipe`) when there is one; else the method's defaults. `recipes_of` names the model whose
    recipes apply instead (``toy`` for a folder of a re-trained toy model)."""
    name = model_recipe(recipes_of or model, method)
    if not name:
        return [f"model.pretrained={model}", f"method={method}"]
    return [f"experiment={name}"] + ([f"model.pretrained={model}"] if recipes_of not in (None, model) else [])


def output_dir(cfg: DictConfig) -> Path:
    """The task's output folder (`output_path`), created."""
    path = output_path(cfg)
    path.mkdir(parents=True, exist_ok=True)
    return path


def output_path(cfg: DictConfig) -> Path:
    """The task's output folder, checked but not created: `output_dir` when set, else the Hydra run folder."""
    if cfg.get("output_dir"):
        path = Path(cfg.output_dir)
    else:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            raise ConfigError("config key 'output_dir': must be set when the task is not launched through `python -m train`")
        path = Path(HydraConfig.get().runtime.output_dir)
    check_output_dir(path)
    return path
