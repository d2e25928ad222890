"""Choosing the device a client trains on."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def resolve_device(spec: str) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` as a usable ``torch.device``.

    ``auto`` picks CUDA when present. Asking for CUDA where there is none (or
    for a GPU index that does not exist) falls back to the CPU with a warning
    rather than failing: a federation should not lose a client over it.
    """
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if not spec.startswith("cuda"):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {spec!r}")
    if not torch.cuda.is_available():
        logger.warning("device %s requested but CUDA is not available; using cpu", spec)
        return torch.device("cpu")
    device = torch.device(spec)
    if device.index is not None and device.index >= torch.cuda.device_count():
        logger.warning("device %s does not exist (%d GPUs); using cuda:0", spec, torch.cuda.device_count())
        return torch.device("cuda:0")
    return device
