"""TensorBoard logging for the tasks: one place that decides where event files go."""
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
    """The Lightning logger for `cfg.logger` (False disables logging)."""
    if cfg.logger.name == "none":
        return False
    from lightning.pytorch.loggers import TensorBoardLogger

    return TensorBoardLogger(save_dir=str(out_dir), name="tensorboard", version="")
