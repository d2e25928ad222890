"""torchvision datasets (cifar10, mnist, fashion_mnist): need files on disk or internet.

Downloading happens only when asked (``dataset.download=true``), so runs never
reach the network by surprise. torchvision is imported only here, lazily.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

from fedlayer.data.types import RawSplits
from fedlayer.torchvision_compat import import_torchvision

TORCHVISION_CLASSES = {"cifar10": "CIFAR10", "mnist": "MNIST", "fashion_mnist": "FashionMNIST"}


def default_root() -> Path:
    """``$FEDLAYER_DATA_ROOT`` if set, else ``~/.cache/fedlayer/data``."""
    return Path(os.environ.get("FEDLAYER_DATA_ROOT", "~/.cache/fedlayer/data")).expanduser()


def _to_nchw(data: object) -> np.ndarray:
    """MNIST-style (N, H, W) uint8 tensors or CIFAR-style (N, H, W, C) uint8 arrays -> NCHW."""
    x = np.asarray(data)
    return x[:, None, :, :] if x.ndim == 3 else x.transpose(0, 3, 1, 2)


@functools.lru_cache(maxsize=None)
def load_torchvision(name: str, root: str, download: bool) -> RawSplits:
    """(train, official test) of torchvision dataset ``name`` stored under ``root``."""
    dataset_cls = getattr(import_torchvision().datasets, TORCHVISION_CLASSES[name])
    splits = []
    for train in (True, False):
        try:
            ds = dataset_cls(root, train=train, download=download)
        except RuntimeError as err:
            if download or "not found" not in str(err).lower():
                raise
            raise FileNotFoundError(
                f"dataset {name!r} is not under {root}; set dataset.download=true to download it "
                f"(needs internet), or dataset.root to where it is stored"
            ) from err
        splits.append((_to_nchw(ds.data), np.asarray(ds.targets, dtype=np.int64)))
    (x_train, y_train), (x_test, y_test) = splits
    return RawSplits(x_train, y_train, x_test, y_test, num_classes=len(ds.classes))
