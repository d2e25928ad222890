"""Serialize and strictly validate LAQ updates (``fedlayer.compressed.v1``).

Protobuf only guarantees that bytes parse; everything a receiver relies on
before touching the payload (sizes, bit widths, radius, names) is checked here,
so a malformed or hostile update fails with one :class:`WireFormatError`
instead of an IndexError or a multi-GB allocation deep in the decoder.
The encoder runs the same checks, so it cannot emit what the decoder rejects.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from fedlayer.wire.bitpack import packed_nbytes
from fedlayer.wire.laq_codec import EncodedTensor
from fedlayer.wire.proto.fedlayer.compressed.v1 import update_pb2

FORMAT_VERSION = 1
MAX_ELEMENTS = 2**31
MAX_NDIM = 32  # numpy 1.x limit; any real parameter tensor has far fewer


class WireFormatError(ValueError):
    """The bytes are not a valid ``CompressedUpdate`` for this receiver."""


@dataclass(frozen=True)
class DecodedUpdate:
    """A validated update; ``tensors`` keep the sender's order."""

    format_version: int
    skip: bool
    tensors: tuple[EncodedTensor, ...]
    clock: int
    quantization_error: float


def encode_update(
    tensors: Iterable[EncodedTensor], *, skip: bool, clock: int, quantization_error: float
) -> bytes:
    """Serialize one client update; raises WireFormatError if it would not validate."""
    msg = update_pb2.CompressedUpdate(
        format_version=FORMAT_VERSION,
        skip=skip,
        client_clock=clock,
        quantization_error=quantization_error,
        tensors=[
            update_pb2.QuantizedTensor(
                name=t.name,
                shape=t.shape,
                bits=t.bits,
                radius=t.radius,
                packed_codes=t.packed_codes,
            )
            for t in tensors
        ],
    )
    _validate(msg, expected=None)
    return msg.SerializeToString()


def decode_update(
    data: bytes, expected: Mapping[str, tuple[int, ...]] | None = None
) -> DecodedUpdate:
    """Parse and validate ``data``.

    ``expected`` maps every tensor name the receiver wants to its shape; when
    given, a non-skip update must carry exactly those names with those shapes.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"expected bytes, got {type(data).__name__}")
    try:
        msg = update_pb2.CompressedUpdate.FromString(bytes(data))
    except (DecodeError, UnicodeDecodeError) as exc:  # the pure-Python backend raises the latter
        raise WireFormatError(f"not a CompressedUpdate: {exc}") from exc
    _validate(msg, expected)
    return DecodedUpdate(
        format_version=msg.format_version,
        skip=msg.skip,
        tensors=tuple(
            EncodedTensor(t.name, tuple(t.shape), t.bits, t.radius, t.packed_codes)
            for t in msg.tensors
        ),
        clock=msg.client_clock,
        quantization_error=msg.quantization_error,
    )


def _validate(
    msg: update_pb2.CompressedUpdate, expected: Mapping[str, tuple[int, ...]] | None
) -> None:
    if msg.format_version != FORMAT_VERSION:
        raise WireFormatError(
            f"unsupported format_version {msg.format_version} "
            f"(this receiver speaks {FORMAT_VERSION})"
        )
    if not (math.isfinite(msg.quantization_error) and msg.quantization_error >= 0):
        raise WireFormatError(
            f"quantization_error must be finite and >= 0, got {msg.quantization_error}"
        )
    if msg.skip:
        if msg.tensors:
            raise WireFormatError(f"skip update carries {len(msg.tensors)} tensors; expected none")
        return

    seen: dict[str, tuple[int, ...]] = {}
    for t in msg.tensors:
        _validate_tensor(t)
        if t.name in seen:
            raise WireFormatError(f"duplicate tensor name {t.name!r}")
        seen[t.name] = tuple(t.shape)
    if expected is not None:
        _check_expected(seen, expected)


def _validate_tensor(t: update_pb2.QuantizedTensor) -> None:
    if not t.name:
        raise WireFormatError("tensor with empty name")
    where = f"tensor {t.name!r}"
    if len(t.shape) > MAX_NDIM:
        raise WireFormatError(f"{where}: {len(t.shape)} dims exceeds {MAX_NDIM}")
    if any(d < 0 for d in t.shape):
        raise WireFormatError(f"{where}: negative dimension in shape {tuple(t.shape)}")
    count = math.prod(t.shape)
    if count > MAX_ELEMENTS:
        raise WireFormatError(f"{where}: {count} elements exceeds limit {MAX_ELEMENTS}")
    if not 1 <= t.bits <= 8:
        raise WireFormatError(f"{where}: bits must be in 1..8, got {t.bits}")
    if not (math.isfinite(t.radius) and t.radius >= 0):
        raise WireFormatError(f"{where}: radius must be finite and >= 0, got {t.radius}")
    want = packed_nbytes(count, t.bits)
    if len(t.packed_codes) != want:
        raise WireFormatError(
            f"{where}: packed_codes is {len(t.packed_codes)} bytes, expected {want} "
            f"for shape {tuple(t.shape)} at {t.bits} bits"
        )


def _check_expected(
    got: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]]
) -> None:
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    if missing or unexpected:
        raise WireFormatError(f"tensor names differ: missing {missing}, unexpected {unexpected}")
    for name, shape in got.items():
        if shape != tuple(expected[name]):
            raise WireFormatError(
                f"tensor {name!r}: shape {shape} differs from expected {tuple(expected[name])}"
            )
