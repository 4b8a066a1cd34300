"""Reproducible safetensors files: the same tensors and metadata always give the same bytes.

``safetensors`` writes its metadata from a hash map, so the key order (and the file's bytes and
sha256) changes from run to run; here the header is rewritten with the metadata keys sorted.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from dreamsteer.data.files import atomic_write

_ALIGN = 8  # safetensors pads its JSON header with spaces to a multiple of 8 bytes


def serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The bytes of a safetensors file of `tensors` (contiguous CPU copies) with sorted `metadata`."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    raw = save(tensors, metadata=dict(metadata) if metadata else None)
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % _ALIGN)
    return len(text).to_bytes(8, "little") + text + raw[8 + size :]


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write `tensors` to `path` atomically, reproducibly, with ``format: pt`` plus `metadata`."""
    data = serialize(tensors, {"format": "pt", **(metadata or {})})
    with atomic_write(path) as f:
        f.write(data)
    return Path(path)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})
