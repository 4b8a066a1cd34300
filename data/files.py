"""Atomic file writes: a temp file in the target's folder, flushed to disk, then `os.replace`, so a crash
never leaves a half-written record that a later run would read as finished.

Temp names carry the writing process's pid (``<name>.<pid>.<random>.tmp``), so a cleanup deletes
only the leftovers of processes that are gone, never a file another live run is writing.

A write that fails for a reason the user can fix (disk full, no permission, read-only file system)
raises `OutputWriteError`, whose message names the path; the CLI prints it as one line.

Temp files and folders from `tempfile` are created 0600 / 0700 whatever the umask; everything made
here gets the mode a plain ``open`` / ``mkdir`` would give it (``0666 & ~umask``, ``0777 & ~umask``),
so outputs are readable by whoever the umask lets read them (a ComfyUI running as another user, a container).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

# errno -> how the message starts (the path follows)
USER_WRITE_ERRORS = {
    errno.ENOSPC: "no space left on",
    errno.EDQUOT: "disk quota exceeded on",
    errno.EACCES: "permission denied on",
    errno.EPERM: "operation not permitted on",
    errno.EROFS: "read-only file system at",
}
_OWNER = re.compile(r"\.(\d+)\.[A-Za-z0-9_]+(\.tmp)?$")


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
    """Turn a user-fixable OSError raised inside the block into an OutputWriteError naming `path`
    (nested blocks: the outermost names the output, e.g. an export folder rather than its temp file)."""
    try:
        yield
    except OSError as err:
        if err.errno not in USER_WRITE_ERRORS:
            raise
        raise OutputWriteError(err.errno, os.strerror(err.errno), str(path)) from err


def temp_prefix(name: str) -> str:
    """Prefix of this process's temp files for `name` (pass to `tempfile.mkstemp` / `mkdtemp`)."""
    return f"{name}.{os.getpid()}."


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def is_orphan_temp(path: str | os.PathLike) -> bool:
    """A temp file/folder named by `temp_prefix` whose writer is gone (or an old name without a pid)."""
    match = _OWNER.search(Path(path).name)
    return match is None or not pid_alive(int(match.group(1)))


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename inside it) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process umask (read by setting it and putting it back: there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_temp_dir(parent: str | os.PathLike, name: str) -> Path:
    """A new empty temp folder for `name` in `parent` (`temp_prefix` naming), with the mode ``mkdir``
    would give it (not mkdtemp's 0700)."""
    with writing(parent):
        path = Path(tempfile.mkdtemp(prefix=temp_prefix(name), dir=parent))
        os.chmod(path, 0o777 & ~current_umask())
    return path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO[Any]]:
    """Yield a temp file beside `path`; when the block ends cleanly it is fsynced and renamed over `path`
    (and the folder fsynced); on an exception it is removed and `path` is left as it was.
    User-fixable OS errors (disk full ...) come out as OutputWriteError naming `path`."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=".tmp", dir=path.parent)
        try:
            os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600
            with os.fdopen(fd, mode, encoding=encoding) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            fsync_dir(path.parent)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def write_text_atomic(text: str, path: str | os.PathLike) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)
    return Path(path)


def write_json_atomic(data: Any, path: str | os.PathLike) -> Path:
    """Write `data` as indented JSON to `path` atomically (non-JSON values are written with `str`)."""
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, default=str)
        f.write("\n")
    return Path(path)
