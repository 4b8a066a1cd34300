"""Logging for the tasks: one place that decides where event files go."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig


def summary_writer(cfg: DictConfig, out_dir: Path):
    """A torch SummaryWriter under `<out_dir>/tensorboard`, or None with `logger=none`."""
    if cfg.logger.name == "none":
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(out_dir / "tensorboard"))


def lightning_logger(cfg: DictConfig, out_dir: Path) -> Any:
    """The Lightning logger for `cfg.logger` (False disables logging): TensorBoard in `<out_dir>/tensorboard`,
    CSV in `<out_dir>/csv/metrics.csv`, Weights & Biases in `<out_dir>/wandb` (offline unless `logger.offline=false`)."""
    name = cfg.logger.name
    if name == "none":
        return False
    if name == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=str(out_dir), name="csv", version="")
    if name == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        return WandbLogger(save_dir=str(out_dir), project=cfg.logger.project, offline=cfg.logger.offline)
    from lightning.pytorch.loggers import TensorBoardLogger

    return TensorBoardLogger(save_dir=str(out_dir), name="tensorboard", version="")
