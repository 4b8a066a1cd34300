"""One writer per output folder: an exclusive lock file that names its holder.

`output_lock(folder, task)` takes ``fcntl.flock`` on ``<folder>/.dreamsteer.lock`` and writes the
holder (task, pid, host, start time, command) into it. A second run on the same folder is refused
with a message naming the holder. The kernel drops a flock when its process dies, so a crashed run
never blocks the next one; a lock still held although the recorded pid is dead on this host (a
leftover child kept the file open) is stale: it is broken and taken over, with a note.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any, Iterator

from dreamsteer.data.files import pid_alive

LOCK_FILE = ".dreamsteer.lock"


class OutputFolderLocked(ValueError):
    """Another run writes to this output folder; the message names it."""


def is_launch_rank_zero() -> bool:
    """True in the process that owns a run: global rank 0, or no distributed launch at all (Lightning's
    DDP re-launch, torchrun and SLURM set these variables in the other ranks)."""
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "SLURM_PROCID"))


def _holder(path: Path) -> dict[str, Any]:
    try:
        holder = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "another process (no details recorded)"
    return f"{holder.get('task', '?')} (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')})"


def _try_lock(path: Path) -> int | None:
    """An fd holding the flock on `path`, or None when another open file holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        raise
    return fd


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike, task: str) -> Iterator[Path]:
    """Hold the exclusive lock of `folder` for the block (OutputFolderLocked when another run holds it)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    try:
        fd = _try_lock(path)
    except OSError as err:
        if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        print(f"warning: {folder} does not support file locks ({err.strerror}); nothing stops a second run writing to it")
        yield path
        return
    if fd is None:
        holder = _holder(path)
        stale = holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) and not pid_alive(holder["pid"])
        if not stale:
            raise OutputFolderLocked(f"output folder {folder} is in use by {_describe(holder)}; "
                                     "wait for it to finish or choose another output folder")
        path.unlink(missing_ok=True)  # the old file stays locked by whoever kept it open; a new one replaces it
        fd = _try_lock(path)
        if fd is None:
            raise OutputFolderLocked(f"output folder {folder}: lost the race for its lock to {_describe(_holder(path))}")
        print(f"took over the stale lock of {folder}: its holder {_describe(holder)} is no longer running")
    try:
        record = {
            "task": task,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": sys.argv,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the flock; the file stays (removing it would race with a waiting run)
