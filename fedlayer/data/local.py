"""A device's own data: an ``.npz`` file or a folder of class sub-folders of images."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from fedlayer.data.types import RawSplits

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_GREY_MODES = {"1", "L", "LA"}


@functools.lru_cache(maxsize=None)
def load_local(path: str) -> RawSplits:
    """Images and labels from ``path`` (no official test set).

    ``.npz``: arrays ``x`` of shape (N, H, W), (N, H, W, C) or (N, C, H, W) and
    integer ``y``; classes are 0..max(y). Folder: ``path/<class>/*.png|jpg``;
    class index = position of the class folder name in sorted order.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"local dataset path does not exist: {p}")
    if p.is_dir():
        return _load_image_folder(p)
    if p.suffix == ".npz":
        return _load_npz(p)
    raise ValueError(f"local dataset path must be an .npz file or an image folder, got {p}")


def _channels_first(x: np.ndarray, source: Path) -> np.ndarray:
    """(N, H, W) / (N, H, W, C) / (N, C, H, W) -> (N, C, H, W); C is at most 4."""
    if x.ndim == 3:
        return x[:, None, :, :]
    if x.ndim == 4 and x.shape[1] <= 4 < x.shape[3]:
        return x
    if x.ndim == 4 and x.shape[3] <= 4:
        return x.transpose(0, 3, 1, 2)
    raise ValueError(f"{source}: x must be (N, H, W), (N, H, W, C) or (N, C, H, W) with C <= 4, got {x.shape}")


def _load_npz(path: Path) -> RawSplits:
    with np.load(path, allow_pickle=False) as archive:
        missing = {"x", "y"} - set(archive.files)
        if missing:
            raise ValueError(f"{path}: missing array(s) {sorted(missing)}; expected 'x' and 'y'")
        x, y = archive["x"], archive["y"]
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise ValueError(f"{path}: x must hold numbers, got {x.dtype}")
    if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1 or len(y) != len(x) or len(y) == 0:
        raise ValueError(f"{path}: y must be a non-empty 1-D integer array with one label per image")
    if y.min() < 0:
        raise ValueError(f"{path}: labels must be >= 0")
    return RawSplits(_channels_first(x, path), y.astype(np.int64), None, None, num_classes=int(y.max()) + 1)


def _load_image_folder(root: Path) -> RawSplits:
    from PIL import Image  # Pillow comes with matplotlib; only this loader needs it

    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files = [
        (f, label)
        for label, name in enumerate(classes)
        for f in sorted((root / name).iterdir())
        if f.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not files:
        raise ValueError(f"{root}: no images found; expected {root}/<class_name>/*.png or *.jpg")
    modes = set()
    for f, _ in files:
        with Image.open(f) as img:  # reads the header only
            modes.add(img.mode)
    mode = "L" if modes <= _GREY_MODES else "RGB"
    arrays = []
    for f, _ in files:
        with Image.open(f) as img:
            arrays.append(np.asarray(img.convert(mode)))
    sizes = {a.shape for a in arrays}
    if len(sizes) > 1:
        raise ValueError(f"{root}: images differ in size {sorted(sizes)}; store them at one size")
    x = np.stack(arrays)
    x = x[:, None, :, :] if mode == "L" else x.transpose(0, 3, 1, 2)
    labels = np.array([label for _, label in files], dtype=np.int64)
    return RawSplits(x, labels, None, None, num_classes=len(classes))
