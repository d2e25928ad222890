"""The one quantised-tensor format: tensors as b-bit differences from a reference both ends hold.

A float32 tensor ``x`` travels as ``x - r`` for a reference ``r`` the sender
and the receiver share. Each encoded tensor is a Flower ``Array`` under the
tensor's own key, with ``stype`` ``CODEC_STYPE`` (the format and its version),
the tensor's shape, and a ``dtype`` naming the encoding of ``data``:

- ``q1`` .. ``q8``: fedlayer's LAQ grid (``quantize.py``): a little-endian
  float32 radius ``R``, then one ``b``-bit code per value, bit-packed
  (``bitpack.py``); the value is ``r + R/(2^b - 1) * (2c - (2^b - 1))``;
- ``s1``: the same layout, the float32 being the mean absolute difference
  (the scale) and each code the sign (EF-SignSGD);
- ``f16``: the difference as float16, little-endian;
- the codec levers' formats (``k<b>`` top-k, ``s1b`` block scales,
  ``m<b>`` a zero-level grid, ``z<dtype>`` zstd): ``levers.py``.

Both ends rebuild the identical ``r + Q(x - r)``. The codec stage sends
2..8 bits on the grid and 1 bit as the sign (``encode_tensor``); LAQ sends its
innovations on the grid at any 1..8 bits (``encode_grid``). Because each
tensor is its own ``Array``, the byte ledger attributes it to its layer as it
does dense arrays. Tensors that cannot be encoded (integers, no reference yet,
a float16 overflow) travel dense in the same record, and the receiver takes
them as they are.

Why Flower's ``Array`` and not a ``.proto`` of our own: ``Array`` *is* a
protobuf message (``flwr/proto/recorddict.proto``: dtype, shape, stype,
data), so a non-Python peer decodes this format with Flower's schema plus the
``data`` layout above; an envelope of our own inside it (LAQ's former
``fedlayer.compressed.v1`` protobuf, carried as one opaque bytes value) hid
which layer each byte belonged to from the ledger and encoded the same
thing a second way.
"""

from __future__ import annotations

import math
import struct

import numpy as np
from flwr.app import Array, ArrayRecord

from fedlayer.wire import levers
from fedlayer.wire.bitpack import pack_codes, packed_nbytes, unpack_codes
from fedlayer.wire.levers import Encoding, LeverError
from fedlayer.wire.quantize import (
    QuantizedTensor,
    dequantize,
    quantize_innovation,
)
from fedlayer.layers import State

#: ``stype`` of an encoded tensor (the version of this format).
CODEC_STYPE = "fedlayer.delta.v1"
#: Bit widths a direction may use; 32 is dense float32 (no codec).
BITS = (32, 16, 8, 4, 2, 1)
DENSE = 32
_RADIUS = struct.Struct("<f")
#: Bits per value of each encoded ``dtype``.
_ENCODED_BITS = {"f16": 16, "s1": 1, **{f"q{bits}": bits for bits in range(1, 9)}}
#: The codec's LAQ grid radius at most this many RMS of the difference, per width (wider grids take the largest value).
GRID_CAP = {2: 2.0, 4: 4.0}
#: The error-feedback residual added to a send is clipped to this multiple of the send's own difference (L2).
RESIDUAL_CLIP = 8.0
#: Below this a difference fits float16 with any error-feedback residual (float16's max, less one float16 step).
_FLOAT16_DENSE = float(np.finfo(np.float16).max) - 32.0


class CodecError(ValueError):
    """Encoded bytes that do not decode against the receiver's reference."""


def encode_tensor(target: np.ndarray, reference: np.ndarray, bits: int) -> tuple[Array, np.ndarray] | None:
    """``target`` as a ``bits``-bit difference from ``reference``: the Array and what the receiver rebuilds.

    None when it must travel dense (a float16 difference that overflows).
    """
    target = np.asarray(target, dtype=np.float32)
    reference = np.asarray(reference, dtype=np.float32)
    shape = tuple(int(d) for d in target.shape)
    if bits == 16:
        diff = np.subtract(target, reference, dtype=np.float32).astype(np.float16)
        if not np.isfinite(diff).all():
            return None
        rebuilt = reference + diff.astype(np.float32)
        return Array(dtype="f16", shape=shape, stype=CODEC_STYPE, data=diff.tobytes()), rebuilt
    if bits == 1:
        return _encode_sign(target, reference, shape)
    return encode_grid(target, reference, bits, GRID_CAP.get(bits))


def encode_grid(target: np.ndarray, reference: np.ndarray, bits: int, cap: float | None = None) -> tuple[Array, np.ndarray]:
    """``target`` on the LAQ grid of ``bits`` (1..8) around ``reference``: the ``q<bits>`` Array and what the receiver rebuilds.

    ``cap``: the radius at most this many RMS of the difference (``quantize_innovation``): the codec
    stage caps its 2- and 4-bit grids (``GRID_CAP``), LAQ keeps its paper's radius.
    ValueError if the difference is not finite or the shapes differ.
    """
    target = np.asarray(target, dtype=np.float32)
    quantized = quantize_innovation(target, reference, bits, cap)
    data = _RADIUS.pack(quantized.radius) + pack_codes(quantized.codes, bits)
    shape = tuple(int(d) for d in target.shape)
    return Array(dtype=f"q{bits}", shape=shape, stype=CODEC_STYPE, data=data), dequantize(quantized, reference)


def _encode_sign(target: np.ndarray, reference: np.ndarray, shape: tuple[int, ...]) -> tuple[Array, np.ndarray]:
    """1 bit: the sign of ``target - reference`` and one float32 scale, the mean absolute difference.

    The mean (not the maximum, the LAQ grid's radius) makes the dropped part
    ``d - scale * sign(d)`` no larger than ``d`` in L2 (EF-SignSGD's contraction).
    """
    diff = np.subtract(target, reference, dtype=np.float32)
    scale = np.float32(np.abs(diff, dtype=np.float64).mean()) if diff.size else np.float32(0)
    if not np.isfinite(scale):
        raise ValueError("innovation g - qhat is not finite")
    codes = (diff >= 0).astype(np.uint8)
    data = _RADIUS.pack(float(scale)) + pack_codes(codes, 1)
    return Array(dtype="s1", shape=shape, stype=CODEC_STYPE, data=data), _signed(codes, scale, reference)


def _signed(codes: np.ndarray, scale: np.float32, reference: np.ndarray) -> np.ndarray:
    """``reference + scale`` where the code is 1, ``reference - scale`` where 0 (the same float32 ops on both ends)."""
    step = np.where(codes.astype(bool), scale, -scale).astype(np.float32)
    return np.add(reference, step, dtype=np.float32)


def decode_tensor(array: Array, reference: np.ndarray) -> np.ndarray:
    """Rebuild a tensor from its encoded Array and the receiver's ``reference``; ``CodecError`` if malformed."""
    if tuple(array.shape) != tuple(reference.shape):
        raise CodecError(f"shape {tuple(array.shape)} differs from the reference's {tuple(reference.shape)}")
    count = math.prod(reference.shape)
    reference = np.asarray(reference, dtype=np.float32)
    if array.dtype not in _ENCODED_BITS:
        return _decode_lever(array.dtype, array.data, reference, count)
    if array.dtype == "f16":
        if len(array.data) != 2 * count:
            raise CodecError(f"f16 data is {len(array.data)} bytes, expected {2 * count}")
        diff = np.frombuffer(array.data, dtype=np.float16).reshape(reference.shape)
        return reference + diff.astype(np.float32)
    bits = _ENCODED_BITS.get(array.dtype)
    if bits is None:
        raise CodecError(f"unknown encoding {array.dtype!r}")
    expected = _RADIUS.size + packed_nbytes(count, bits)
    if len(array.data) != expected:
        raise CodecError(f"{array.dtype} data is {len(array.data)} bytes, expected {expected}")
    (radius,) = _RADIUS.unpack_from(array.data)
    if not (math.isfinite(radius) and radius >= 0):
        raise CodecError(f"radius must be finite and >= 0, got {radius}")
    codes = unpack_codes(array.data[_RADIUS.size :], bits, count).reshape(reference.shape)
    if array.dtype == "s1":
        return _signed(codes, np.float32(radius), reference)
    return dequantize(QuantizedTensor(codes, radius, bits), reference)


def _decode_lever(dtype: str, data: bytes, reference: np.ndarray, count: int) -> np.ndarray:
    """The levers' formats (``levers``): ``z<dtype>`` (zstd), ``s1b`` (block scales), ``k<b>`` (top-k), ``m<b>`` (zero-level grid), ``l<r>`` (low rank)."""
    try:
        if dtype.startswith("z") and len(dtype) > 1 and not dtype[1:].startswith("z"):
            inner = levers.decompress(data, levers.payload_limit(count))
            return decode_tensor(Array(dtype=dtype[1:], shape=reference.shape, stype=CODEC_STYPE, data=inner), reference)
        if dtype == "s1b":
            return levers.decode_block_sign(data, reference)
        if dtype[:1] == "k" and dtype[1:].isdigit() and int(dtype[1:]) in levers.TOPK_WIDTHS:
            return levers.decode_topk(data, reference, int(dtype[1:]))
        if dtype[:1] == "m" and dtype[1:].isdigit() and int(dtype[1:]) in levers.MIDTREAD_WIDTHS:
            return levers.decode_midtread(data, reference, int(dtype[1:]))
        if _low_rank_of(dtype) is not None and len(reference.shape) >= 2:
            return levers.decode_low_rank(data, reference, int(dtype[1:]))
    except LeverError as err:
        raise CodecError(f"{dtype}: {err}") from None
    raise CodecError(f"unknown encoding {dtype!r}")


def _dtype_bits(dtype: str) -> int | None:
    """Bits per value of an encoded ``dtype`` (a top-k one: of its kept values); None if unknown."""
    base = dtype[1:] if dtype.startswith("z") else dtype
    if base == "s1b":
        return 1
    if base[:1] == "k" and base[1:].isdigit():
        return int(base[1:])
    if base[:1] == "m" and base[1:].isdigit() and int(base[1:]) in levers.MIDTREAD_WIDTHS:
        return int(base[1:])
    if _low_rank_of(base) is not None:
        return 8  # its factors' codes
    return _ENCODED_BITS.get(base)


def _low_rank_of(dtype: str) -> int | None:
    """The rank of a low-rank ``dtype`` (``l1`` .. ``l64``), else None."""
    if dtype[:1] == "l" and dtype[1:].isdigit() and 1 <= int(dtype[1:]) <= levers.MAX_RANK:
        return int(dtype[1:])
    return None


def encoded_bits(array: Array) -> int:
    """The bits per value ``array`` travels at: ``DENSE`` for a plain array; ``CodecError`` for an unknown encoding."""
    if array.stype != CODEC_STYPE:
        return DENSE
    bits = _dtype_bits(array.dtype)
    if bits is None:
        raise CodecError(f"unknown encoding {array.dtype!r}")
    return bits


def grid_bits(array: Array) -> int | None:
    """The bits of a tensor on the LAQ grid (``q1`` .. ``q8``); None for a dense array or another encoding."""
    if array.stype != CODEC_STYPE or not array.dtype.startswith("q"):
        return None
    return _ENCODED_BITS.get(array.dtype)


def check_encoding(record: ArrayRecord, reference: State, bits: int | Encoding, setting: str) -> None:
    """``CodecError`` unless every tensor of ``record`` travels as a sender configured for ``bits`` sends it.

    Such a sender (``encode_state``) encodes every float32 tensor that has a
    reference of its shape at ``bits``; the others, and at 16 bits a difference
    that overflows float16, travel dense. ``setting`` names the configured field
    in the message (``up_bits``). With levers on (an ``Encoding``), each
    encoded tensor must be in a format such a sender produces, and a bit
    budget must hold over the record.
    """
    if isinstance(bits, Encoding):
        if not bits.plain:
            _check_levers(record, reference, bits, setting)
            return
        bits = bits.bits
    for key, array in record.items():
        sent = encoded_bits(array)
        if sent != DENSE and array.dtype not in _ENCODED_BITS:  # a lever's format (top-k, block scales, zstd)
            raise CodecError(f"reply encodes {key} as {array.dtype!r}, configured {setting}={bits} without levers")
        if sent == bits:
            continue
        if sent != DENSE:
            raise CodecError(f"reply encoded at {sent} bits ({key}), configured {setting}={bits}")
        ref = reference.get(key)
        if array.dtype != "float32" or ref is None or tuple(array.shape) != tuple(ref.shape):
            continue  # not encodable: dense is what any sender sends
        if bits == 16 and _overflows_float16(array, ref):
            continue
        raise CodecError(f"reply sends {key} dense (32 bits), configured {setting}={bits}")


def _check_levers(record: ArrayRecord, reference: State, encoding: Encoding, setting: str) -> None:
    """``check_encoding`` for an encoding with levers on."""
    spent, values = 0, 0
    for key, array in record.items():
        if array.stype != CODEC_STYPE:
            ref = reference.get(key)
            if array.dtype == "float32" and ref is not None and tuple(array.shape) == tuple(ref.shape) and encoding.coded:
                raise CodecError(f"reply sends {key} dense (32 bits), configured {setting}={encoding.describe()}")
            continue
        zipped = array.dtype.startswith("z") and encoding.entropy == "zstd"
        base = array.dtype[1:] if zipped else array.dtype
        width = next((w for w in encoding.widths() if encoding.tensor_dtype(w, tuple(array.shape)) == base), None)
        if width is None:
            raise CodecError(f"reply encodes {key} as {array.dtype!r}, configured {setting}={encoding.describe()}")
        count = math.prod(array.shape)
        spent, values = spent + width * count, values + count
    if encoding.budget_bits is not None and spent > encoding.budget_bits * values:
        raise CodecError(f"reply spends {spent / max(values, 1):.3f} bits a value, configured budget_bits={encoding.budget_bits}")


def _overflows_float16(array: Array, reference: np.ndarray) -> bool:
    """Whether a dense tensor's difference from ``reference`` may not fit float16 (why a 16-bit sender sends it dense).

    The sender tested the difference plus its error-feedback residual, at most
    half a float16 step (16 near the top of the range): within that of the
    limit, either may have overflowed.
    """
    try:
        value = array.numpy()
    except Exception as err:  # corrupt bytes raise many kinds of errors
        raise CodecError(f"dense array does not decode: {err}") from None
    with np.errstate(over="ignore", invalid="ignore"):
        diff = np.abs(np.subtract(value, reference, dtype=np.float32))
    return not (diff < _FLOAT16_DENSE).all()  # NaN counts as overflow: validation refuses it later


def encodable(value: np.ndarray, reference: State, key: str) -> bool:
    """Whether ``value`` can travel encoded: float32, with a reference of its shape."""
    ref = reference.get(key)
    return value.dtype == np.float32 and ref is not None and ref.shape == value.shape


def encode_state(
    target: State, reference: State, bits: int | Encoding, residual: State | None = None
) -> tuple[ArrayRecord, State, State]:
    """``target`` (plus the sender's ``residual``) encoded against ``reference``.

    Returns the record, what the receiver rebuilds, and the new residual
    (what the quantiser dropped: error feedback, added to the next send).
    Keys that travel dense are rebuilt exactly and leave no residual.
    ``bits`` may be an ``Encoding`` with levers (``levers``).
    """
    if isinstance(bits, Encoding) and not bits.plain:
        return _encode_levers(target, reference, bits, residual)
    bits = bits.bits if isinstance(bits, Encoding) else bits
    arrays: dict[str, Array] = {}
    rebuilt: State = {}
    new_residual: State = {}
    for key, value in target.items():
        encoded = None
        if encodable(value, reference, key):
            intended = value + _clipped(residual[key], value, reference[key]) if residual is not None and key in residual else value
            encoded = encode_tensor(intended, reference[key], bits)
        if encoded is None:
            arrays[key], rebuilt[key] = Array(np.require(value, requirements="C")), value
            continue
        arrays[key], rebuilt[key] = encoded
        if residual is not None:
            new_residual[key] = intended - rebuilt[key]
    return ArrayRecord(arrays), rebuilt, new_residual


def _encode_levers(
    target: State, reference: State, encoding: Encoding, residual: State | None
) -> tuple[ArrayRecord, State, State]:
    """``encode_state`` with levers: widths from the bit budget, top-k, block scales, zstd."""
    # top-k leaves most of a difference behind for a while: a fixed update's residual settles near 0.45/topk
    # times the update (measured, 4 bits, topk 0.05 and 0.1), so the bound is twice that; a client's residual
    # from a participation rounds ago is added to a new difference, and a looser bound (8/topk) let such stale
    # residuals make sends the norm guard refused (FedLAMA, 20 clients, 30% a round)
    clip = max(RESIDUAL_CLIP, 1.0 / encoding.topk)
    intended: State = {}
    for key, value in target.items():
        if encodable(value, reference, key):
            owed = residual.get(key) if residual is not None else None
            intended[key] = value + _clipped(owed, value, reference[key], clip) if owed is not None else value
    widths = {key: encoding.bits for key in intended}
    if encoding.budget_bits is not None:
        widths = levers.allocate_widths({key: _difference_stats(intended[key], reference[key]) for key in intended}, encoding.budget_bits)
    arrays: dict[str, Array] = {}
    rebuilt: State = {}
    new_residual: State = {}
    for key, value in target.items():
        if key not in intended:
            arrays[key], rebuilt[key] = Array(np.require(value, requirements="C")), value
            continue
        arrays[key], rebuilt[key] = _encode_one(intended[key], reference[key], encoding, widths[key])
        if residual is not None:
            new_residual[key] = intended[key] - rebuilt[key]
    return ArrayRecord(arrays), rebuilt, new_residual


def _encode_one(target: np.ndarray, reference: np.ndarray, encoding: Encoding, bits: int) -> tuple[Array, np.ndarray]:
    target = np.asarray(target, dtype=np.float32)
    reference = np.asarray(reference, dtype=np.float32)
    shape = tuple(int(d) for d in target.shape)
    dtype = encoding.tensor_dtype(bits, shape)
    if dtype.startswith("l"):
        data, rebuilt = levers.encode_low_rank(np.subtract(target, reference, dtype=np.float32), reference, encoding.rank)
    elif dtype.startswith("k"):
        data, rebuilt = levers.encode_topk(np.subtract(target, reference, dtype=np.float32), reference, encoding.topk, bits)
    elif dtype == "s1b":
        data, rebuilt = levers.encode_block_sign(np.subtract(target, reference, dtype=np.float32), reference, encoding.block)
    elif dtype.startswith("m"):
        data, rebuilt = levers.encode_midtread(np.subtract(target, reference, dtype=np.float32), reference, bits, encoding.step)
    else:
        encoded = encode_tensor(target, reference, bits)
        if encoded is None:
            raise ValueError("a 16-bit difference overflows float16")  # 16 bits is not offered with levers
        array, rebuilt = encoded
        data = array.data
    array = Array(dtype=dtype, shape=shape, stype=CODEC_STYPE, data=data)
    return (levers.compress(array) if encoding.entropy == "zstd" else array), rebuilt


def _difference_stats(target: np.ndarray, reference: np.ndarray) -> tuple[int, float, float, float]:
    """What a bit budget weighs a tensor by: values, sum of squares, sum of magnitudes, largest magnitude."""
    diff = np.abs(np.subtract(target, reference, dtype=np.float32), dtype=np.float64)
    return diff.size, float(np.square(diff).sum()), float(diff.sum()), float(diff.max(initial=0.0))


def _clipped(residual: np.ndarray, value: np.ndarray, reference: np.ndarray, factor: float = RESIDUAL_CLIP) -> np.ndarray:
    """``residual`` scaled down to at most ``RESIDUAL_CLIP`` times ``value - reference`` in L2 norm.

    What the quantiser dropped is owed to the receiver, but a layer that
    travels rarely (FedLAMA's long-interval layers) or whose difference
    shrinks can build up a residual far above its current update; sent whole,
    it is quantised on a grid its own size, and what the coarse grid drops
    feeds the next residual and the model the client trains from next (with
    FedLAMA phi=4 at 2 bits on animal10k an update reached norm 1e26; at 1 bit
    a sign's residual grows with the rounds even for a fixed update). Clipped, every send
    is at most ``1 + RESIDUAL_CLIP`` times the client's own difference, and a
    residual never outgrows what the layer is doing now; a steady update
    (a residual below the bound) keeps exact error feedback.
    """
    limit = factor * float(np.linalg.norm(np.subtract(value, reference, dtype=np.float32)))
    norm = float(np.linalg.norm(residual))
    if not norm > limit:  # NaN norms are caught by the encoder
        return residual
    return (residual * np.float32(limit / norm)).astype(np.float32)


def decode_state(record: ArrayRecord, reference: State) -> State:
    """Every tensor of ``record``: encoded ones rebuilt against ``reference``, dense ones as they are."""
    state: State = {}
    for key, array in record.items():
        if array.stype != CODEC_STYPE:
            state[key] = array.numpy()
            continue
        if key not in reference:
            raise CodecError(f"{key}: encoded, but there is no reference for it")
        try:
            state[key] = decode_tensor(array, reference[key])
        except CodecError as err:
            raise CodecError(f"{key}: {err}") from None
    return state
