"""Per-client models on disk, read back one layer at a time.

pFedLA keeps every client's latest model on the server. Held in RAM that is
``N x model size`` and grows with the federation, so each model lives in its
own flat float32 file (``client-NNNNN.f32``) and is read one layer slice at a
time with ``np.fromfile(offset=...)``: no memory map stays open, so neither
the heap nor the resident set grows with the number of clients. A client
that never trained has no file; it reads as the shared initial model.

Integer tensors (BatchNorm's ``num_batches_tracked``) are stored as float32
(exact below 2**24) and restored to their dtype on read.

Files are versioned by the round that wrote them (``FileVersions``): the
index of current versions is part of the server checkpoint, so a run resumed
after a crash mid-round reads exactly the files of the checkpointed round and
discards what the crashed round had already written.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from fedlayer.files import atomic_write, keep_newest
from fedlayer.layers import ModelLayers, State

STORE_DTYPE = np.dtype(np.float32)


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
        """Make ``version`` current; drop versions beyond the ``keep`` newest."""
        self.current[client] = version
        kept = sorted({*self._on_disk.get(client, []), version})
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


class ClientModelStore:
    """Flat per-client model files under ``root``, laid out in model order.

    Parameters
    ----------
    root : Path
        Folder for the files (created on demand).
    layers : ModelLayers
        The model's layers; fixes the layout of every file.
    initial : State
        The model a client has before it ever trained.
    """

    def __init__(self, root: Path, layers: ModelLayers, initial: State) -> None:
        self.root = Path(root)
        self.layers = layers
        self.offsets: dict[str, tuple[int, int]] = {}
        start = 0
        for layer in layers:
            self.offsets[layer.name] = (start, layer.numel)
            start += layer.numel
        self.numel = start
        self.initial = self.flatten(initial)
        self.versions = FileVersions(self.root, "client", ".f32")

    # ------------------------------------------------------------ layout
    def flatten(self, state: State, names: list[str] | None = None) -> np.ndarray:
        """The named layers (all by default) of ``state`` as one float32 vector."""
        chosen = self.layers.names if names is None else names
        parts = [np.asarray(state[key], dtype=STORE_DTYPE).ravel() for key in self.layers.keys_of(chosen)]
        return np.concatenate(parts) if parts else np.zeros(0, STORE_DTYPE)

    def float_mask(self, name: str) -> np.ndarray:
        """True for the entries of a layer's flat slice that are floating point."""
        layer = self.layers[name]
        return np.concatenate(
            [
                np.full(int(np.prod(shape)), np.issubdtype(np.dtype(dtype), np.floating))
                for shape, dtype in zip(layer.shapes, layer.dtypes)
            ]
        )

    def unflatten_layer(self, name: str, flat: np.ndarray) -> State:
        """One layer's tensors from its flat slice, in their own shapes and dtypes."""
        layer = self.layers[name]
        out: State = {}
        start = 0
        for key, shape, dtype in zip(layer.keys, layer.shapes, layer.dtypes):
            size = int(np.prod(shape))
            value = flat[start : start + size].reshape(shape)
            target = np.dtype(dtype)
            out[key] = value.astype(target) if np.issubdtype(target, np.floating) else np.rint(value).astype(target)
            start += size
        return out

    # -------------------------------------------------------------- files
    def clients(self) -> list[int]:
        """Clients with a stored model."""
        return sorted(self.versions.current)

    def write(self, client: int, flat: np.ndarray, version: int = 0) -> None:
        """Store a client's whole flat model as ``version`` (atomically: temp file + rename)."""
        if flat.shape != (self.numel,):
            raise ValueError(f"flat model has shape {flat.shape}, expected ({self.numel},)")
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write(self.versions.path(client, version), np.ascontiguousarray(flat, dtype=STORE_DTYPE).tobytes())
        self.versions.commit(client, version)

    def read_layer(self, client: int, name: str) -> np.ndarray:
        """One layer of a client's model as a flat float32 vector (a fresh copy)."""
        start, size = self.offsets[name]
        path = self.versions.current_path(client)
        if path is None:
            return self.initial[start : start + size].copy()
        return np.fromfile(path, dtype=STORE_DTYPE, count=size, offset=start * STORE_DTYPE.itemsize)

    def iter_layer(self, clients: list[int], name: str) -> Iterator[tuple[int, np.ndarray]]:
        """``(client, flat layer)`` for each client, one slice in memory at a time."""
        for client in clients:
            yield client, self.read_layer(client, name)

    def mix_layer(self, clients: list[int], weights: np.ndarray, name: str) -> np.ndarray:
        """``sum_j weights[j] * theta_j^name`` over ``clients``, streamed.

        Clients with zero weight are not read.
        """
        _, size = self.offsets[name]
        acc = np.zeros(size, dtype=np.float64)
        for weight, client in zip(weights, clients):
            if weight != 0.0:
                acc += float(weight) * self.read_layer(client, name)
        return acc.astype(STORE_DTYPE)
