"""Pixel transforms: fit images to a square size, standardise per channel."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def fit_image_size(x: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad (centred) or bilinearly resize float32 (N, C, H, W) images to size x size.

    Padding is used when it can be centred exactly (both sides grow by an even
    amount), e.g. 28 -> 32 for MNIST-like data feeding a 32x32 CNN; otherwise resize.
    Apply before standardising so the padding is the images' own background (0).
    """
    if size < 1:
        raise ValueError(f"image_size must be >= 1, got {size}")
    h, w = x.shape[2:]
    if (h, w) == (size, size):
        return x
    dh, dw = size - h, size - w
    if dh >= 0 and dw >= 0 and dh % 2 == 0 and dw % 2 == 0:
        return np.pad(x, ((0, 0), (0, 0), (dh // 2, dh // 2), (dw // 2, dw // 2)))
    resized = F.interpolate(torch.from_numpy(x), size=(size, size), mode="bilinear", align_corners=False)
    return resized.numpy()


def channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of (N, C, H, W) images; a constant channel gets std 1."""
    mean = x.mean(axis=(0, 2, 3), dtype=np.float64)
    std = x.std(axis=(0, 2, 3), dtype=np.float64)
    std[std == 0] = 1.0
    return mean, std


def standardise(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(x - mean) / std per channel, as contiguous float32."""
    shape = (1, -1, 1, 1)
    out = (x - mean.astype(np.float32).reshape(shape)) / std.astype(np.float32).reshape(shape)
    return np.ascontiguousarray(out, dtype=np.float32)
