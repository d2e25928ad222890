"""Tensor codecs in the style of OpenFL pipeline transforms.

A codec's ``encode`` is the forward transform (tensor -> wire-ready record),
``decode`` the backward one, and ``lossy`` says whether ``decode(encode(x))``
may differ from ``x``.  Every encode also returns an :class:`EncodeReport` so
callers can log what the transform cost and what it lost.

Codecs are stateless: the LAQ reference point ``qhat`` belongs to the caller
(the client keeps its last upload, the server its last received value).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import prod

import numpy as np

from fedlayer.wire.bitpack import pack_codes, unpack_codes
from fedlayer.wire.quantize import (
    QuantizedTensor,
    dequantize,
    quantization_error,
    quantize_innovation,
    squared_distance,
)


@dataclass(frozen=True)
class EncodeReport:
    """What one encode cost and lost.

    ``bytes_after`` is the exact size this tensor adds to a serialized
    ``fedlayer.compressed.v1.CompressedUpdate`` (payload, radius and the
    protobuf header: name, shape, bits, field tags and lengths).
    """

    bytes_before: int
    bytes_after: int
    squared_error: float


@dataclass(frozen=True)
class EncodedTensor:
    """One LAQ-quantized tensor as it travels (mirrors the QuantizedTensor message)."""

    name: str
    shape: tuple[int, ...]
    bits: int
    radius: float
    packed_codes: bytes
    report: EncodeReport | None = field(default=None, compare=False)


class LAQCodec:
    """Lossy LAQ codec: quantize the innovation ``g - qhat`` and bit-pack the codes."""

    lossy = True

    def encode(
        self, name: str, g: np.ndarray, qhat: np.ndarray, bits: int
    ) -> tuple[EncodedTensor, np.ndarray]:
        """Return the wire-ready tensor and ``Q``, exactly what :meth:`decode` rebuilds."""
        g = np.asarray(g, dtype=np.float32)
        qt = quantize_innovation(g, qhat, bits)
        packed = pack_codes(qt.codes, bits)
        q = dequantize(qt, qhat)
        report = EncodeReport(
            bytes_before=g.nbytes,
            bytes_after=_tensor_wire_nbytes(name, g.shape, bits, qt.radius, len(packed)),
            squared_error=quantization_error(q, g),
        )
        return EncodedTensor(name, tuple(g.shape), bits, qt.radius, packed, report), q

    def decode(self, enc: EncodedTensor, qhat: np.ndarray) -> np.ndarray:
        """Rebuild ``Q`` (float32, ``enc.shape``) from the packed codes and ``qhat``."""
        codes = unpack_codes(enc.packed_codes, enc.bits, prod(enc.shape))
        qt = QuantizedTensor(codes.reshape(enc.shape), enc.radius, enc.bits)
        return dequantize(qt, qhat)


def innovation_norm_sq(q_new: np.ndarray, qhat: np.ndarray) -> float:
    """``||Q - qhat||^2``: the innovation energy that LAQ's skip rule compares."""
    return squared_distance(q_new, qhat)


def _tensor_wire_nbytes(
    name: str, shape: tuple[int, ...], bits: int, radius: float, payload: int
) -> int:
    """Size of one QuantizedTensor as an element of CompressedUpdate.tensors.

    Follows proto3 encoding of update.proto (default-valued fields are
    omitted; every field number is < 16 so each tag is one byte);
    tests/test_proto.py checks it against the real serializer.
    """
    name_len = len(name.encode("utf-8"))
    shape_len = sum(_varint_len(d) for d in shape)
    size = 0
    size += 1 + _varint_len(name_len) + name_len if name_len else 0
    size += 1 + _varint_len(shape_len) + shape_len if shape else 0
    size += 1 + _varint_len(bits) if bits else 0
    size += 5 if radius else 0
    size += 1 + _varint_len(payload) + payload if payload else 0
    return 1 + _varint_len(size) + size


def _varint_len(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)
