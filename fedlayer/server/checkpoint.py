"""Atomic, checksummed checkpoints of everything a run needs to resume.

A checkpoint is one file per completed round, ``checkpoints/round-NNNNNN.ckpt``:
a NumPy ``.npz`` archive (arrays stored natively, no pickle) holding the
global model, every numpy array found in the strategy state, and a JSON
document with the rest (strategy state with array references, ledger, round).
The file ends with a SHA-256 digest of everything before it, so a truncated
or corrupted file is detected on load and the previous checkpoint is used.
Writes go to a temp file that is fsynced and renamed: a crash leaves either
the old file or the new one, never half of one.

The round loop writes in the background (``save_in_background``): the
checkpoint is copied at once, so it holds the state as the round left it,
and a thread encodes, writes, fsyncs and prunes while the next round runs; the next
save, and the end of the run, join it. So a crash may lose the newest
checkpoint as well as the round in progress; the run then resumes one round
earlier, which is why clients keep their state of the 3 newest rounds
(``NodeStateFiles``) and versioned per-client files their 3 newest versions.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import re
import threading
from dataclasses import dataclass
from logging import WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common.logger import log

from fedlayer.files import atomic_write, keep_newest
from fedlayer.layers import State

MAGIC = b"FLCKPT1\n"
_DIGEST = hashlib.sha256().digest_size
_NAME = re.compile(r"round-(\d{6})\.ckpt$")
_ARRAY_REF = "__ndarray__"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be trusted."""


@dataclass
class Checkpoint:
    """What a completed round leaves behind."""

    round: int
    global_state: State
    strategy_state: dict[str, Any]
    ledger_state: dict[str, Any]
    extra: dict[str, Any]


def _split_arrays(value: Any, arrays: dict[str, np.ndarray], prefix: str) -> Any:
    """Replace numpy arrays in a nested structure by references."""
    if isinstance(value, np.ndarray):
        key = f"s/{prefix}"
        arrays[key] = value
        return {_ARRAY_REF: key}
    if isinstance(value, dict):
        return {str(k): _split_arrays(v, arrays, f"{prefix}/{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_split_arrays(v, arrays, f"{prefix}/{i}") for i, v in enumerate(value)]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _join_arrays(value: Any, arrays: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {_ARRAY_REF}:
            return arrays[value[_ARRAY_REF]]
        return {k: _join_arrays(v, arrays) for k, v in value.items()}
    if isinstance(value, list):
        return [_join_arrays(v, arrays) for v in value]
    return value


def encode_checkpoint(checkpoint: Checkpoint) -> bytes:
    """Serialise a checkpoint (with its trailing digest)."""
    arrays: dict[str, np.ndarray] = {f"g/{k}": v for k, v in checkpoint.global_state.items()}
    meta = {
        "round": checkpoint.round,
        "global_keys": list(checkpoint.global_state),
        "strategy": _split_arrays(checkpoint.strategy_state, arrays, "strategy"),
        "ledger": checkpoint.ledger_state,
        "extra": _split_arrays(checkpoint.extra, arrays, "extra"),
    }
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    body = MAGIC + buffer.getvalue()
    return body + hashlib.sha256(body).digest()


def decode_checkpoint(data: bytes) -> Checkpoint:
    """Parse and verify a checkpoint; raise ``CheckpointError`` if it is damaged."""
    if len(data) < len(MAGIC) + _DIGEST or not data.startswith(MAGIC):
        raise CheckpointError("not a fedlayer checkpoint (bad header or truncated)")
    body, digest = data[:-_DIGEST], data[-_DIGEST:]
    if hashlib.sha256(body).digest() != digest:
        raise CheckpointError("checksum mismatch (corrupt or partial file)")
    with np.load(io.BytesIO(body[len(MAGIC) :]), allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    meta = json.loads(arrays.pop("__meta__").tobytes())
    return Checkpoint(
        round=int(meta["round"]),
        global_state={k: arrays[f"g/{k}"] for k in meta["global_keys"]},
        strategy_state=_join_arrays(meta["strategy"], arrays),
        ledger_state=meta["ledger"],
        extra=_join_arrays(meta["extra"], arrays),
    )


class CheckpointStore:
    """The checkpoints of one run directory; keeps the newest ``keep`` files."""

    def __init__(self, run_dir: Path, keep: int = 2) -> None:
        self.directory = run_dir / "checkpoints"
        self.keep = keep
        self._writer: threading.Thread | None = None
        self._failed: BaseException | None = None

    def save(self, checkpoint: Checkpoint) -> Path:
        """Write the checkpoint of a completed round, then prune old ones."""
        self.wait()
        path = self.directory / f"round-{checkpoint.round:06d}.ckpt"
        self._write(path, encode_checkpoint(checkpoint))
        return path

    def save_in_background(self, checkpoint: Checkpoint) -> Path:
        """Copy the checkpoint now; encode, write and prune it in a thread; ``wait`` joins it.

        The copy (arrays and containers, a memcpy of the model) lets the
        strategy change its state right away; encoding (zip, CRC, SHA-256) and
        the fsync are what leave the round's path. The previous background
        write is joined first: one at a time.
        """
        self.wait()
        path = self.directory / f"round-{checkpoint.round:06d}.ckpt"
        snapshot = copy.deepcopy(checkpoint)
        self._writer = threading.Thread(target=self._write_noting_failure, args=(path, snapshot), name="fedlayer-checkpoint")
        self._writer.start()
        return path

    def wait(self) -> None:
        """Return once no checkpoint is being written; raise what made the last background write fail."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._failed is not None:
            failed, self._failed = self._failed, None
            raise failed

    def _write(self, path: Path, data: bytes) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data)
        keep_newest(self.paths(), self.keep)

    def _write_noting_failure(self, path: Path, checkpoint: Checkpoint) -> None:
        try:
            self._write(path, encode_checkpoint(checkpoint))
        except BaseException as err:  # raised again by wait(), in the round loop
            self._failed = err

    def paths(self) -> list[Path]:
        """Checkpoint files, oldest first."""
        if not self.directory.exists():
            return []
        return sorted(p for p in self.directory.iterdir() if _NAME.search(p.name))

    def latest(self) -> Checkpoint | None:
        """The newest checkpoint that verifies; damaged ones are skipped with a warning."""
        self.wait()
        for path in reversed(self.paths()):
            try:
                return decode_checkpoint(path.read_bytes())
            except (CheckpointError, ValueError, OSError, KeyError) as err:
                log(WARNING, "checkpoint %s is unusable (%s); trying the previous one", path, err)
        return None
