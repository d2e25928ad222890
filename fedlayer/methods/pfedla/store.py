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

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from fedlayer.files import FileVersions, atomic_write
from fedlayer.layers import ModelLayers, State

STORE_DTYPE = np.dtype(np.float32)


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
