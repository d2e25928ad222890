"""In-memory image datasets shared by loaders, partitioning and training."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


# eq=False: hashing and equality by identity, so a dataset (which holds
# unhashable arrays) can key functools caches such as the federated split's.
@dataclass(frozen=True, eq=False)
class ArrayDataset:
    """Normalised images ``x`` (float32, N x C x H x W) with labels ``y`` (int64, N).

    Loaders cache and share these arrays: treat them as read-only.
    """

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    name: str

    def __post_init__(self) -> None:
        if self.x.ndim != 4 or self.x.dtype != np.float32:
            raise ValueError(f"{self.name}: x must be float32 (N, C, H, W), got {self.x.dtype} {self.x.shape}")
        if self.y.ndim != 1 or self.y.dtype != np.int64 or len(self.y) != len(self.x):
            raise ValueError(
                f"{self.name}: y must be int64 (N,) matching x, "
                f"got {self.y.dtype} {self.y.shape} for {len(self.x)} images"
            )
        if len(self.y) and (self.y.min() < 0 or self.y.max() >= self.num_classes):
            raise ValueError(f"{self.name}: labels must lie in 0..{self.num_classes - 1}")

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, indices: np.ndarray) -> ArrayDataset:
        """The examples at ``indices`` (copied), same classes and name."""
        indices = np.asarray(indices, dtype=np.int64)
        return ArrayDataset(self.x[indices], self.y[indices], self.num_classes, self.name)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.x.shape[1:]
        return (int(c), int(h), int(w))


@dataclass(frozen=True, eq=False)
class RawSplits:
    """Decoded images in their stored pixel range, before resizing and standardisation.

    ``x_*`` are (N, C, H, W) of any real dtype; ``y_*`` are int64. ``x_test`` and
    ``y_test`` are None when the source has no official test set.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray | None
    y_test: np.ndarray | None
    num_classes: int
