"""Atomic file writes: a temp file in the target's folder, then `os.replace`, so a crash never
leaves a half-written record that a later run would read as finished.

A write that fails for a reason the user can fix (disk full, no permission, read-only file system)
raises `OutputWriteError`, whose message names the path; the CLI prints it as one line.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

# errno -> how the message starts (the path follows)
USER_WRITE_ERRORS = {
    errno.ENOSPC: "no space left on",
    errno.EDQUOT: "disk quota exceeded on",
    errno.EACCES: "permission denied writing",
    errno.EPERM: "operation not permitted on",
    errno.EROFS: "read-only file system at",
}


class OutputWriteError(OSError):
    """Writing an output failed for a reason the user can fix; ``str()`` is one line naming the path."""

    def __str__(self) -> str:
        return f"{USER_WRITE_ERRORS[self.errno]} {self.filename}"


def as_write_error(err: OSError, path: str | os.PathLike | None = None) -> OutputWriteError | None:
    """`err` as an OutputWriteError naming `path` (or the error's own file name), or None when the user cannot fix it."""
    if isinstance(err, OutputWriteError):
        return err
    if err.errno not in USER_WRITE_ERRORS:
        return None
    where = path if path is not None else err.filename or "the output device"
    return OutputWriteError(err.errno, os.strerror(err.errno), str(where))


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn a user-fixable OSError raised inside the block into an OutputWriteError naming `path`."""
    try:
        yield
    except OSError as err:
        mapped = as_write_error(err, path)
        if mapped is None or mapped is err:
            raise
        raise mapped from err


def write_json_atomic(data: Any, path: str | os.PathLike) -> Path:
    """Write `data` as indented JSON to `path` atomically (non-JSON values are written with `str`)."""
    path = Path(path)
    with writing(path):
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
