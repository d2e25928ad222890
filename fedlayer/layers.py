"""Layers: the one vocabulary every fedlayer strategy speaks.

A model is an ordered list of named layers. A layer is the group of state-dict
keys owned by one module (a conv's weight and bias; a BatchNorm's weight, bias
and running statistics), so that whatever a strategy selects, a module always
travels whole. The server keeps the model as a plain ``dict[str, ndarray]``
(a *state*); these helpers select, extract and merge layer subsets of such
states and convert them to and from Flower ``ArrayRecord`` objects.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord

State = dict[str, np.ndarray]
_BLOCK = 1 << 16  # elements per block in squared_distance (512 KiB of float64)


@dataclass(frozen=True)
class Layer:
    """One layer: a module's state-dict keys, in model order."""

    name: str
    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    @property
    def numel(self) -> int:
        """Number of scalars in the layer (``dim_l`` in FedLAMA)."""
        return int(sum(int(np.prod(s)) for s in self.shapes))

    @property
    def nbytes(self) -> int:
        """Raw size of the layer's tensors, without serialisation overhead."""
        return int(
            sum(int(np.prod(s)) * np.dtype(d).itemsize for s, d in zip(self.shapes, self.dtypes))
        )


def module_of(key: str) -> str:
    """The owning module of a state-dict key: everything before the last dot."""
    return key.rsplit(".", 1)[0] if "." in key else key


class ModelLayers:
    """The ordered layers of a model, with lookup by layer name and by key."""

    def __init__(self, layers: Iterable[Layer]) -> None:
        self.layers: tuple[Layer, ...] = tuple(layers)
        self._by_name = {layer.name: layer for layer in self.layers}
        if len(self._by_name) != len(self.layers):
            raise ValueError("layer names must be unique")
        self._layer_of_key = {key: layer.name for layer in self.layers for key in layer.keys}
        self.keys_set: frozenset[str] = frozenset(self._layer_of_key)

    @classmethod
    def from_state(cls, state: Mapping[str, np.ndarray]) -> ModelLayers:
        """Group a state dict's keys by owning module, keeping model order."""
        groups: dict[str, list[str]] = {}
        for key in state:
            groups.setdefault(module_of(key), []).append(key)
        return cls(
            Layer(
                name=name,
                keys=tuple(keys),
                shapes=tuple(tuple(np.shape(state[k])) for k in keys),
                dtypes=tuple(str(np.asarray(state[k]).dtype) for k in keys),
            )
            for name, keys in groups.items()
        )

    # --- lookup -------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Layer names in model order."""
        return [layer.name for layer in self.layers]

    @property
    def keys(self) -> list[str]:
        """All state-dict keys in model order."""
        return [key for layer in self.layers for key in layer.keys]

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.layers)

    def __getitem__(self, name: str) -> Layer:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"unknown layer {name!r}; layers are {self.names}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def layer_of(self, key: str) -> str:
        """Name of the layer that owns a state-dict key."""
        try:
            return self._layer_of_key[key]
        except KeyError:
            raise KeyError(f"state-dict key {key!r} belongs to no layer") from None

    def keys_of(self, names: Iterable[str]) -> list[str]:
        """State-dict keys of the named layers, in model order."""
        wanted = set(names)
        unknown = wanted - self._by_name.keys()
        if unknown:
            raise KeyError(f"unknown layers {sorted(unknown)}")
        return [key for layer in self.layers if layer.name in wanted for key in layer.keys]

    def layers_in(self, keys: Iterable[str]) -> list[str]:
        """Names of the layers fully present in a set of keys, in model order."""
        present = set(keys)
        return [layer.name for layer in self.layers if set(layer.keys) <= present]

    def numel(self, names: Iterable[str] | None = None) -> int:
        """Number of scalars in the named layers (all layers by default)."""
        chosen = self.layers if names is None else [self[n] for n in names]
        return sum(layer.numel for layer in chosen)


# --- state helpers -----------------------------------------------------------
def select(state: Mapping[str, np.ndarray], layers: ModelLayers, names: Iterable[str]) -> State:
    """The sub-state holding exactly the named layers."""
    return {key: state[key] for key in layers.keys_of(names)}


def merge(base: Mapping[str, np.ndarray], update: Mapping[str, np.ndarray]) -> State:
    """A new state: ``base`` with the keys of ``update`` replaced (copied)."""
    merged = dict(base)
    for key, value in update.items():
        if key not in merged:
            raise KeyError(f"cannot merge unknown key {key!r}")
        merged[key] = np.array(value, dtype=merged[key].dtype, copy=True)
    return merged


def copy_state(state: Mapping[str, np.ndarray]) -> State:
    """A deep copy of a state."""
    return {key: np.array(value, copy=True) for key, value in state.items()}


def states_equal(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> bool:
    """True when both states have the same keys and bitwise equal tensors."""
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes()
        for k in a
    )


def squared_distance(a: np.ndarray, b: np.ndarray) -> float:
    """``||a - b||^2`` accumulated in float64, in cache-sized blocks.

    float64 because float32 sums drift at 10M entries and ``d**2`` can
    overflow float32; blocks so no float64 copy of the whole tensor is made.
    Not ``np.dot``: multi-threaded BLAS spin-waits and was up to 10x slower
    on an oversubscribed CPU.
    """
    a = np.asarray(a, dtype=np.float32).reshape(-1)
    b = np.asarray(b, dtype=np.float32).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"size mismatch: {a.size} vs {b.size}")
    buf = np.empty(min(a.size, _BLOCK), dtype=np.float64)
    total = 0.0
    for start in range(0, a.size, _BLOCK):
        d = buf[: min(_BLOCK, a.size - start)]
        np.subtract(a[start : start + _BLOCK], b[start : start + _BLOCK], out=d)
        np.square(d, out=d)
        total += float(d.sum())
    return total


# --- conversions --------------------------------------------------------------
def to_arrayrecord(state: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Wrap a state as a Flower ``ArrayRecord`` (key order kept)."""
    # np.require keeps 0-d tensors 0-d (np.ascontiguousarray would make them 1-d).
    return ArrayRecord({key: Array(np.require(value, requirements="C")) for key, value in state.items()})


def from_arrayrecord(record: ArrayRecord) -> State:
    """Unwrap a Flower ``ArrayRecord`` into a state of numpy arrays."""
    return {key: array.numpy() for key, array in record.items()}


def torch_state_to_numpy(state_dict: Mapping[str, object]) -> State:
    """A torch state dict as numpy arrays (detached CPU copies)."""
    return {key: value.detach().cpu().numpy().copy() for key, value in state_dict.items()}  # type: ignore[attr-defined]


def numpy_to_torch_state(state: Mapping[str, np.ndarray]) -> dict[str, object]:
    """A numpy state as torch tensors, ready for ``load_state_dict``."""
    import torch

    return {key: torch.from_numpy(np.array(value, copy=True)) for key, value in state.items()}
