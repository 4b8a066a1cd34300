"""Trimmed Lightning checkpoints: the personalization modules save only the adapter's trainable state.

A checkpoint is a plain dict (``torch.load(weights_only=True)`` reads it): Lightning's loop,
optimizer and scheduler state, ``hyper_parameters["config"]`` (the whole run config), and
``state_dict`` = ``{"unet.<...>" | "text_encoder.<...>": tensor}`` for the trainable parameters only.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file."""


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a run folder (its ``checkpoints/last.ckpt``)."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / "checkpoints" / "last.ckpt", path / "last.ckpt"):
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(f"checkpoint folder {path}: no checkpoints/last.ckpt or last.ckpt inside")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path}: not found")
    return path


def read_trimmed_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a personalization checkpoint safely (no pickled code) and check it has what an export needs."""
    path = resolve_checkpoint(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError ... for bad files
        raise CheckpointError(f"checkpoint {path}: cannot be read safely ({type(err).__name__}: {err})") from err
    config = checkpoint.get("hyper_parameters", {}).get("config") if isinstance(checkpoint, dict) else None
    if not isinstance(config, dict) or "method" not in config or "state_dict" not in checkpoint:
        raise CheckpointError(f"checkpoint {path}: not written by `python -m train personalize` (no config / state_dict)")
    checkpoint["path"] = str(path)
    return checkpoint


class AtomicFileCheckpointIO(TorchCheckpointIO):
    """Write checkpoints with ``torch.save`` straight into a temp file beside the target, then ``os.replace``.

    As atomic as Lightning's default writer, which first serializes the whole checkpoint into an
    in-memory buffer and then copies it out: for DreamBooth (UNet + two Adam moments) that costs
    twice the checkpoint size in host memory at every save. Remote (``scheme://``) paths keep the default.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            torch.save(checkpoint, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
