"""What a method reports when its run ends: numbers only.

Strategies fill a ``MethodReport`` (``LayerwiseStrategy.final_report``); the
server writes and draws it (``fedlayer.server.artifacts``), so no strategy
writes files or imports matplotlib.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class IntervalHistory:
    """FedLAMA's aggregation interval of each layer, per round (``intervals.png``)."""

    rows: Sequence[tuple[int, dict[str, int]]]
    layer_names: Sequence[str]
    phi: int


@dataclass(frozen=True)
class LayerWeights:
    """pFedLA's final aggregation weights (layer x client x client) and self-weights per round (``<name>.npy/.png``)."""

    final: np.ndarray
    layer_names: Sequence[str]
    self_weights: Sequence[tuple[int, dict[str, float]]]
    name: str = "pfedla_alpha"


@dataclass(frozen=True)
class MethodReport:
    """A method's end-of-run numbers: JSON documents by file name, and the series the server draws."""

    documents: dict[str, dict[str, Any]] = field(default_factory=dict)
    intervals: IntervalHistory | None = None
    layer_weights: LayerWeights | None = None
