"""Writes that survive a crash or a power cut: fsync the data, rename, fsync the folder.

    atomic_write(path, data)   # `path` holds the old content or the whole new one, never a part
    synced_write(path, data)   # `path` holds `data` on disk once this returns (no rename)
    fsync_dir(folder)          # a rename or a new name in `folder` is on disk

Used by the coordinator's store and releases and by the client's download, which all
promise that a kill -9 at any point leaves a state they can recover from. No dependencies.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

#: Prefix of the temporary names `atomic_write` uses; a reader may delete leftovers that carry it.
TEMP_PREFIX = ".tmp-"


def fsync_dir(path: str | Path) -> None:
    """Make a rename or a new entry in folder `path` durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def synced_write(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` and fsync it (the caller renames or fsyncs the folder)."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that `path` holds either the old or the whole new content."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
