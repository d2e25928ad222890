"""Crash-safe file writes and pruning of numbered files."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
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
    """Delete all but the last ``keep`` of ``paths`` (oldest first; files or folders); return what is left."""
    for old in paths[: max(len(paths) - keep, 0)]:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    return list(paths[max(len(paths) - keep, 0) :])


#: While set (``deferred_pruning``): the (files, client) pairs whose old versions wait to be pruned.
_DEFERRED: ContextVar[list[tuple[FileVersions, int]] | None] = ContextVar("fedlayer_deferred_pruning", default=None)


@contextmanager
def deferred_pruning() -> Iterator[list[tuple[FileVersions, int]]]:
    """Within the block ``FileVersions.commit`` deletes no old version; it lists what it would prune.

    A server round that may still be rolled back runs in it, so that rolling
    back (restoring the version index, which deletes the newer files) leaves
    exactly the files the round started with. Once the round is committed,
    ``prune`` the list.
    """
    pending: list[tuple[FileVersions, int]] = []
    token = _DEFERRED.set(pending)
    try:
        yield pending
    finally:
        _DEFERRED.reset(token)


def prune(pending: list[tuple[FileVersions, int]]) -> None:
    """Do the pruning a ``deferred_pruning`` block put off."""
    for files, client in dict.fromkeys(pending):
        files.prune(client)


class FileVersions:
    """One file per (client, version) under ``root``; an index says which version is current.

    Writers get a path for a new version, write it (temp file + rename) and
    ``commit`` it; readers ask for the current path. The ``keep`` newest
    versions of a client stay on disk, so an older checkpoint (kept as a
    fallback) still finds its files. Which versions are on disk is tracked in
    memory (the folder is listed once, on restore), so a write costs no listing.
    """

    def __init__(self, root: Path, stem: str, suffix: str, keep: int = 3) -> None:
        self.root = Path(root)
        self.stem = stem
        self.suffix = suffix
        self.keep = keep
        self.current: dict[int, int] = {}
        self._on_disk: dict[int, list[int]] = {}
        self._name = re.compile(rf"{re.escape(stem)}-(\d+)\.v(\d+){re.escape(suffix)}")

    def _files(self) -> list[tuple[int, int]]:
        """``(client, version)`` of every file on disk."""
        if not self.root.exists():
            return []
        matches = (self._name.fullmatch(path.name) for path in self.root.iterdir())
        return [(int(m.group(1)), int(m.group(2))) for m in matches if m]

    def path(self, client: int, version: int) -> Path:
        return self.root / f"{self.stem}-{client:05d}.v{version:06d}{self.suffix}"

    def current_path(self, client: int) -> Path | None:
        """The client's current file; None if it has none."""
        version = self.current.get(client)
        return None if version is None else self.path(client, version)

    def commit(self, client: int, version: int) -> None:
        """Make ``version`` current; drop versions beyond the ``keep`` newest (later, in ``deferred_pruning``)."""
        self.current[client] = version
        self._on_disk[client] = sorted({*self._on_disk.get(client, []), version})
        deferred = _DEFERRED.get()
        if deferred is None:
            self.prune(client)
        else:
            deferred.append((self, client))

    def prune(self, client: int) -> None:
        """Delete the client's versions beyond the ``keep`` newest."""
        kept = self._on_disk.get(client, [])
        keep_newest([self.path(client, v) for v in kept], self.keep)
        self._on_disk[client] = kept[-self.keep :]

    def state_dict(self) -> dict[str, int]:
        return {str(client): version for client, version in self.current.items()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore the index; delete versions written after it (a crashed round's work)."""
        self.current = {int(client): int(version) for client, version in state.items()}
        self._on_disk = {}
        for client, version in self._files():
            if version > self.current.get(client, -1):
                self.path(client, version).unlink(missing_ok=True)
            else:
                self._on_disk.setdefault(client, []).append(version)
