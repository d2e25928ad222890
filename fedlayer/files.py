"""Crash-safe file writes and pruning of numbered files."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file, fsync and rename, then fsync the folder.

    A crash leaves either the old file or the new one, never half of one.
    """
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def keep_newest(paths: Sequence[Path], keep: int) -> list[Path]:
    """Delete all but the last ``keep`` of ``paths`` (oldest first); return what is left."""
    for old in paths[: max(len(paths) - keep, 0)]:
        old.unlink(missing_ok=True)
    return list(paths[max(len(paths) - keep, 0) :])
