"""LAQ innovation quantizer (Sun et al., NeurIPS 2019).

The worker keeps ``qhat``, the value it last uploaded.  A new vector ``g`` is
quantized on a uniform grid of ``2**bits`` levels centred at ``qhat``:

    R     = ||g - qhat||_inf
    delta = R / (2**bits - 1)
    c     = floor((g - qhat + R + delta) / (2 * delta))      in 0 .. 2**bits - 1
    Q     = qhat - R + 2 * delta * c

so ``|Q - g| <= delta`` per coordinate. With ``cap`` (the codec stage's
widths up to 4 bits) ``R`` is at most ``cap`` times the RMS of ``g - qhat``
and values beyond it are clipped to the outermost level: one outlier then no
longer sets the step for the whole tensor (what was clipped is owed through
the sender's error feedback or the next download's difference).  ``R`` is rounded to float32 *before*
the codes are computed, because float32 is what travels on the wire; sender and
receiver then both run :func:`dequantize` on identical inputs and reconstruct a
bit-identical ``Q``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedlayer.wire.bitpack import check_bits


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """Integer codes (uint8, shape of ``g``) plus the float32-exact radius R."""

    codes: np.ndarray
    radius: float
    bits: int


def quantize_innovation(g: np.ndarray, qhat: np.ndarray, bits: int, cap: float | None = None) -> QuantizedTensor:
    """Quantize ``g - qhat`` with ``bits`` bits per coordinate (``cap``: the radius at most this many RMS).

    Raises ValueError on a shape mismatch, ``bits`` outside 1..8, or a
    non-finite innovation (NaN/inf in ``g`` or ``qhat``).
    """
    max_code = _max_code(bits)
    g = np.asarray(g, dtype=np.float32)
    qhat = np.asarray(qhat, dtype=np.float32)
    if g.shape != qhat.shape:
        raise ValueError(f"shape mismatch: g {g.shape} vs qhat {qhat.shape}")
    diff = np.subtract(g, qhat, out=np.empty(g.shape, np.float32))  # ndarray even if 0-d
    # max/min reductions avoid the temporary that np.abs would allocate;
    # np.maximum (unlike max()) propagates NaN into the finiteness check.
    radius = np.maximum(diff.max(initial=0), -diff.min(initial=0))
    if not np.isfinite(radius):
        raise ValueError("innovation g - qhat is not finite")
    if radius == 0:
        return QuantizedTensor(np.zeros(g.shape, dtype=np.uint8), 0.0, bits)
    capped = False
    if cap is not None:
        limit = np.float32(cap * math.sqrt(float(np.square(diff, dtype=np.float64).mean())))
        capped = bool(0 < limit < radius)
        radius = limit if capped else radius

    # (d + R + delta) / (2 delta) == (M/2) * (d/R) + (M+1)/2 with M = 2**bits - 1.
    # Dividing by R first keeps every intermediate in [0.5, M+0.5] (|d| <= R
    # exactly, and IEEE rounding is monotonic), so a tiny, even subnormal, R
    # cannot overflow, and truncation by astype equals floor.
    np.divide(diff, radius, out=diff)
    if capped:
        np.clip(diff, -1, 1, out=diff)
    np.multiply(diff, np.float32(max_code / 2), out=diff)
    np.add(diff, np.float32((max_code + 1) / 2), out=diff)
    codes = diff.astype(np.uint8)
    np.minimum(codes, max_code, out=codes)  # guard; cheap on uint8
    return QuantizedTensor(codes, float(radius), bits)


def dequantize(qt: QuantizedTensor, qhat: np.ndarray) -> np.ndarray:
    """Reconstruct ``Q = qhat - R + 2 * delta * codes`` as float32.

    Evaluated as ``qhat + delta * (2 * codes - M)`` with ``delta = R / M``
    rounded to float32: ``2c - M`` is an exact small integer and no
    intermediate exceeds R, so nothing overflows.  The result depends only on
    ``codes``, the float32 ``radius`` and ``qhat``, and each step is one IEEE
    float32 operation, so every machine computes the same bits.
    """
    max_code = _max_code(qt.bits)
    qhat = np.asarray(qhat, dtype=np.float32)
    if qhat.shape != qt.codes.shape:
        raise ValueError(f"shape mismatch: codes {qt.codes.shape} vs qhat {qhat.shape}")
    delta = np.float32(float(np.float32(qt.radius)) / max_code)
    q = np.multiply(qt.codes, np.float32(2), dtype=np.float32, out=np.empty(qhat.shape, np.float32))
    np.subtract(q, np.float32(max_code), out=q)
    np.multiply(q, delta, out=q)
    np.add(q, qhat, out=q)
    return q


def _max_code(bits: int) -> int:
    check_bits(bits)
    return (1 << int(bits)) - 1
