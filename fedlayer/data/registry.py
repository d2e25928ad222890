"""``load_dataset``: every dataset by name, resized and standardised the same way."""

from __future__ import annotations

import functools

import numpy as np

from fedlayer.data.bundled import load_animal10k, load_digits, load_mnist5k
from fedlayer.data.local import load_local
from fedlayer.data.torchvision_sets import (
    TORCHVISION_CLASSES,
    default_root,
    load_torchvision,
)
from fedlayer.data.transforms import channel_stats, fit_image_size, standardise
from fedlayer.data.types import ArrayDataset, RawSplits

DATASETS: tuple[str, ...] = ("mnist5k", "animal10k", "digits", "cifar10", "mnist", "fashion_mnist", "local")
_BUNDLED = {"mnist5k": load_mnist5k, "animal10k": load_animal10k, "digits": load_digits}


@functools.lru_cache(maxsize=16)
def load_dataset(
    name: str,
    *,
    root: str | None = None,
    download: bool = False,
    path: str | None = None,
    image_size: int | None = None,
) -> tuple[ArrayDataset, ArrayDataset | None]:
    """(train pool, official test set or None) of dataset ``name``.

    ``root``/``download`` apply to torchvision datasets only, ``path`` to ``local``.
    ``image_size`` zero-pads or resizes images to image_size x image_size.
    Images are standardised per channel with the train pool's statistics.
    """
    return _finalise(name, _load_raw(name, root=root, download=download, path=path), image_size)


def _load_raw(name: str, *, root: str | None, download: bool, path: str | None) -> RawSplits:
    if name in _BUNDLED:
        return _BUNDLED[name]()
    if name in TORCHVISION_CLASSES:
        return load_torchvision(name, str(root or default_root()), bool(download))
    if name == "local":
        if not path:
            raise ValueError("dataset 'local' needs a path (dataset.path): an .npz file or an image folder")
        return load_local(str(path))
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def _finalise(name: str, raw: RawSplits, image_size: int | None) -> tuple[ArrayDataset, ArrayDataset | None]:
    def prepare(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float32)
        return x if image_size is None else fit_image_size(x, int(image_size))

    # Standardising is scale invariant, so pixels need no rescaling to [0, 1] first.
    x_train = prepare(raw.x_train)
    mean, std = channel_stats(x_train)
    train = ArrayDataset(standardise(x_train, mean, std), raw.y_train, raw.num_classes, name)
    if raw.x_test is None or raw.y_test is None:
        return train, None
    test = ArrayDataset(standardise(prepare(raw.x_test), mean, std), raw.y_test, raw.num_classes, f"{name}-test")
    return train, test
