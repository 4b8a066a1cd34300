"""Trimmed Lightning checkpoints: the personalization modules save only the adapter's trainable state.

A checkpoint is a plain dict (``torch.load(weights_only=True)`` reads it): Lightning's loop,
optimizer and scheduler state, ``hyper_parameters["config"]`` (the whole run config), and
``state_dict`` = ``{"unet.<...>" | "text_encoder.<...>": tensor}`` for the trainable parameters only.
"""
from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from dreamsteer.data.files import atomic_write, is_orphan_temp


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


def check_checkpoint_file(path: str | os.PathLike) -> Path:
    """Refuse, without loading it, a file that ``torch.load(weights_only=True)`` would refuse: anything but a
    torch zip archive, or one that pickles Python objects other than tensors and plain containers."""
    path = Path(path)
    only = "only checkpoints written by `python -m train personalize` are loaded (torch.load with weights_only=True)"
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"checkpoint {path}: not a torch checkpoint archive (truncated, or a plain pickle?); {only}")
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as err:  # a damaged archive: torch raises RuntimeError, KeyError, UnpicklingError ...
        raise CheckpointError(f"checkpoint {path}: cannot be read ({type(err).__name__}); {only}") from None
    if unsafe:
        raise CheckpointError(f"checkpoint {path}: pickles Python objects ({', '.join(sorted(unsafe)[:3])}) that a weights-only load refuses; {only}")
    return path


def read_trimmed_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a personalization checkpoint safely (no pickled code) and check it has what an export needs."""
    path = check_checkpoint_file(resolve_checkpoint(path))
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError ... for bad files
        raise CheckpointError(f"checkpoint {path}: cannot be read safely ({type(err).__name__}: {err})") from err
    config = checkpoint.get("hyper_parameters", {}).get("config") if isinstance(checkpoint, dict) else None
    if not isinstance(config, dict) or "method" not in config or "state_dict" not in checkpoint:
        raise CheckpointError(f"checkpoint {path}: not written by `python -m train personalize` (no config / state_dict)")
    checkpoint["path"] = str(path)
    return checkpoint


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's dict, memory-mapped (cheap even for a DreamBooth UNet); CheckpointError in one line
    for an empty, truncated or foreign file."""
    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path}: cannot be read (empty file)")
    check_checkpoint_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # zip reader, unpickler and EOF errors of a damaged file
        reason = "empty file" if path.stat().st_size == 0 else f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        raise CheckpointError(f"checkpoint {path}: cannot be read ({reason})") from None


def _step_of(path: Path) -> tuple[int, int]:
    """(step, version) of ``step000012.ckpt`` / ``step000012-v1.ckpt``; (-1, 0) for other names."""
    match = re.fullmatch(r"step(\d+)(?:-v(\d+))?\.ckpt", path.name)
    return (int(match.group(1)), int(match.group(2) or 0)) if match else (-1, 0)


def recover_checkpoint_dir(directory: str | os.PathLike) -> None:
    """Clean what killed runs left in a checkpoint folder: temp files of dead writers are deleted, and a
    versioned duplicate (``step000012-v1.ckpt``, written when a resumed run reached a step whose file
    already existed) replaces its base name, so the folder holds one file per step."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for path in directory.glob("*.tmp"):
        if is_orphan_temp(path):
            path.unlink(missing_ok=True)
    for path in sorted(directory.glob("step*-v*.ckpt"), key=_step_of):
        step, version = _step_of(path)
        if version:
            os.replace(path, directory / f"step{step:06d}.ckpt")


def find_resume_checkpoint(directory: str | os.PathLike, clean: bool = True) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint of `directory` to resume from: the loadable one with the highest step (``last.ckpt``
    on a tie), so a corrupt ``last.ckpt`` or a kill before the first one falls back to ``step*.ckpt``.

    Unreadable files are named in one line each and, with `clean`, renamed to ``<name>.corrupt`` (so a
    resumed run does not write ``-v1`` copies beside them). None when the folder has no checkpoint;
    CheckpointError when it has some but none loads.
    """
    directory = Path(directory)
    if clean:
        recover_checkpoint_dir(directory)
    candidates = [directory / "last.ckpt"] + sorted(directory.glob("step*.ckpt"), key=_step_of, reverse=True)
    candidates = [p for p in candidates if p.is_file()]
    best: tuple[int, Path, dict[str, Any]] | None = None
    bad = []
    for path in candidates:
        try:
            checkpoint = load_checkpoint(path)
        except CheckpointError as err:
            bad.append(path)
            print(f"warning: {err}; skipped" + (f", kept as {path.name}.corrupt" if clean else ""))
            continue
        step = int(checkpoint.get("global_step", -1))
        if best is None or step > best[0]:
            best = (step, path, checkpoint)
    if clean:
        for path in bad:
            os.replace(path, path.with_name(path.name + ".corrupt"))
    if best is None:
        if bad:
            raise CheckpointError(f"checkpoint folder {directory}: no checkpoint can be read ({', '.join(p.name for p in bad)}); "
                                  "remove the folder or set ckpt_path=null to start over")
        return None
    step, path, checkpoint = best
    if path.name != "last.ckpt":
        print(f"resuming from {path} (step {step}), the newest readable checkpoint")
    return path, checkpoint


def step_checkpoints(directory: str | os.PathLike, every_n_steps: int, keep_all: bool = False) -> ModelCheckpoint:
    """Lightning's checkpoint callback as the training tasks use it: ``step<NNNNNN>.ckpt`` every
    `every_n_steps` steps (only the newest kept unless `keep_all`) and ``last.ckpt``, which resumes read."""
    return ModelCheckpoint(
        dirpath=str(directory),
        filename="step{step:06d}",
        auto_insert_metric_name=False,
        every_n_train_steps=every_n_steps,
        save_top_k=-1 if keep_all else 1,
        save_last=True,
        enable_version_counter=False,  # a resume with another checkpoint interval still rewrites last.ckpt
    )


class AtomicFileCheckpointIO(TorchCheckpointIO):
    """Write checkpoints with ``torch.save`` straight into a temp file beside the target, fsync, then ``os.replace``.

    As atomic as Lightning's default writer, which first serializes the whole checkpoint into an
    in-memory buffer and then copies it out: for DreamBooth (UNet + two Adam moments) that costs
    twice the checkpoint size in host memory at every save. Remote (``scheme://``) paths keep the default.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        with atomic_write(path) as f:
            torch.save(checkpoint, f)
