"""Atomic file writes: a temp file in the target's folder, then `os.replace`, so a crash never
leaves a half-written record that a later run would read as finished."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_json_atomic(data: Any, path: str | os.PathLike) -> Path:
    """Write `data` as indented JSON to `path` atomically (non-JSON values are written with `str`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, default=str)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
