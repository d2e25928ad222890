"""The codec's levers past plain widths (issue #26), each off by default.

- **1 bit with block scales** (``s1b``): the sign of each difference and one
  float32 scale per ``block`` values (their mean magnitude), so a tensor whose
  parts move at different sizes is not sent at one average size.
- **Top-k** (``k<b>``): only the ``topk`` share of the difference with the
  largest magnitudes travels; their positions as a bitmap or as delta-coded
  LEB128 varints, whichever is smaller; their values at ``b`` bits (32: float32,
  8/4/2: the LAQ grid, 1: sign and mean magnitude). The receiver keeps its
  reference where nothing was sent; what was left behind stays in the sender's
  error-feedback residual (uplink) or in the difference from the client's
  reference (downlink), so it travels later.
- **Entropy coding** (``z<dtype>``): the coded payload compressed with
  zstandard, kept only where it is smaller; the ledger counts what crosses.
- **A grid with a zero level, its step from the RMS** (``m<b>``, ``step``):
  codes ``-h .. h`` (``h = 2^(b-1) - 1``) times one float32 step, ``step``
  times the difference's root mean square. The LAQ grid (``q<b>``) has no
  zero level and takes its step from the largest value, so one outlier of a
  stale client coarsens the whole tensor and every small value still costs a
  sign; here small values fall on zero (which entropy coding then makes
  cheap), values beyond ``h`` steps are clipped, and what was clipped stays in
  the error-feedback residual (uplink) or in the download's difference.
- **Low-rank factors** (``l<r>``, ``rank``): a matrix (a tensor of two or
  more dimensions, read as its first dimension by the rest) whose rank-``r``
  factors hold at most ``LOW_RANK_SHARE`` of its values travels as them: the
  best rank-``r`` approximation of the difference (a randomised SVD, Halko et
  al. 2011; its singular values split evenly over both factors, as in
  PowerSGD), each factor as int8 codes of one scale. What the approximation
  leaves out stays in the error-feedback residual (uplink) or in the
  download's difference, so the rest of the spectrum travels in later rounds.
  A fully connected layer of 3136 x 512 at rank 4 sends 14,592 bytes for
  1,605,632 values (0.07 bits each). Smaller tensors use the direction's width.
- **Per-tensor bit budgets** (``budget_bits``): the sender spreads a budget of
  value bits per parameter over the tensors it sends, from the allowed widths
  ``BUDGET_WIDTHS``, by the quantisation error each width would leave
  (estimated from the tensor's own difference), greedily where it buys most.

Every format is self-describing (the ``dtype`` names it) and both ends rebuild
bit-identical tensors (the same float32 operations on the same inputs).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

import numpy as np
import zstandard
from flwr.app import Array

from fedlayer.wire.bitpack import pack_codes, packed_nbytes, unpack_codes
from fedlayer.wire.quantize import QuantizedTensor, dequantize, quantize_innovation

#: Entropy coders of the coded payload.
ENTROPY = ("none", "zstd")
#: Widths a bit budget chooses from.
BUDGET_WIDTHS = (1, 2, 4, 8)
#: Widths the kept values of top-k may use (16 is not offered: float16 may overflow).
TOPK_WIDTHS = (32, 8, 4, 2, 1)
#: Widths the zero-level grid (``m<b>``) takes: 1 bit has no zero level (the sign formats serve it).
MIDTREAD_WIDTHS = (2, 4, 8)
#: A tensor travels as rank-r factors when they hold at most this share of its values.
LOW_RANK_SHARE = 1 / 8
#: The largest rank offered (so the integer product of two int8 factors stays exact in float32: 64 * 127^2 < 2^24).
MAX_RANK = 64
_OVERSAMPLE, _POWER_ITERATIONS = 4, 2
#: zstandard level: 3 (its default) compresses 4-bit codes within 1% of level 19 at a fraction of the time.
ZSTD_LEVEL = 3
_F32 = struct.Struct("<f")
_U32 = struct.Struct("<I")
_TOPK_HEADER = struct.Struct("<IBI")  # kept values, index coding (0 bitmap, 1 varint), index bytes
_BITMAP, _VARINT = 0, 1


class LeverError(ValueError):
    """Encoded bytes that do not decode (``tensors.CodecError`` wraps it with the key)."""


@dataclass(frozen=True)
class Encoding:
    """How one direction encodes: a width plus the levers (defaults: plain ``bits``)."""

    bits: int
    block: int = 0
    topk: float = 1.0
    entropy: str = "none"
    budget_bits: float | None = None
    step: float | None = None
    rank: int = 0

    @property
    def plain(self) -> bool:
        """No lever on: the plain ``bits``-bit format."""
        return (self.block == 0 and self.topk >= 1.0 and self.entropy == "none" and self.budget_bits is None
                and self.step is None and self.rank == 0)

    @property
    def coded(self) -> bool:
        """Whether anything is encoded (else float32 travels dense)."""
        return self.bits != 32 or self.topk < 1.0

    def levers(self) -> str:
        """The levers as the short JSON string a train message carries to the client."""
        return json.dumps({"block": self.block, "topk": self.topk, "entropy": self.entropy, "budget_bits": self.budget_bits,
                           "step": self.step, "rank": self.rank}, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_levers(cls, bits: int, text: str) -> Encoding:
        values = json.loads(text)
        step = values.get("step")
        return cls(int(bits), int(values["block"]), float(values["topk"]), str(values["entropy"]),
                   None if values["budget_bits"] is None else float(values["budget_bits"]), None if step is None else float(step),
                   int(values.get("rank", 0)))

    def widths(self) -> tuple[int, ...]:
        """The widths a tensor may travel at."""
        return BUDGET_WIDTHS if self.budget_bits is not None else (self.bits,)

    def dtype(self, bits: int) -> str:
        """The ``dtype`` a tensor coded at ``bits`` travels as, before entropy coding."""
        if self.topk < 1.0:
            return f"k{bits}"
        if bits == 1 and self.block:
            return "s1b"
        if self.step is not None and bits in MIDTREAD_WIDTHS:
            return f"m{bits}"
        return "f16" if bits == 16 else f"q{bits}" if bits > 1 else "s1"

    def tensor_dtype(self, bits: int, shape: tuple[int, ...]) -> str:
        """The ``dtype`` a tensor of ``shape`` coded at ``bits`` travels as: its low-rank factors where they fit."""
        return f"l{self.rank}" if low_rank_fits(shape, self.rank) else self.dtype(bits)

    def describe(self) -> str:
        return str(self.bits) if self.plain else f"{self.bits} ({self.levers()})"


# --------------------------------------------------------------- 1 bit, block scales
def encode_block_sign(diff: np.ndarray, reference: np.ndarray, block: int) -> tuple[bytes, np.ndarray]:
    """Signs of ``diff`` and one scale (mean magnitude) per ``block`` values: the data and the rebuilt tensor."""
    flat = diff.reshape(-1)
    blocks = -(-flat.size // block)
    padded = np.zeros(blocks * block, np.float64)
    padded[: flat.size] = np.abs(flat)
    sums = padded.reshape(blocks, block).sum(axis=1)
    counts = np.full(blocks, block, np.float64)
    if blocks:
        counts[-1] = flat.size - (blocks - 1) * block
    scales = (sums / counts).astype(np.float32)
    if not np.isfinite(scales).all():
        raise ValueError("innovation g - qhat is not finite")
    codes = (flat >= 0).astype(np.uint8)
    data = _U32.pack(block) + scales.astype("<f4").tobytes() + pack_codes(codes, 1)
    return data, _block_signed(codes, scales, block, reference)


def decode_block_sign(data: bytes, reference: np.ndarray) -> np.ndarray:
    count = reference.size
    if len(data) < _U32.size:
        raise LeverError("s1b data shorter than its header")
    (block,) = _U32.unpack_from(data)
    if block < 1:
        raise LeverError(f"block must be >= 1, got {block}")
    blocks = -(-count // block)
    expected = _U32.size + 4 * blocks + packed_nbytes(count, 1)
    if len(data) != expected:
        raise LeverError(f"s1b data is {len(data)} bytes, expected {expected}")
    scales = np.frombuffer(data, "<f4", blocks, _U32.size).astype(np.float32)
    if not (np.isfinite(scales).all() and (scales >= 0).all()):
        raise LeverError("block scales must be finite and >= 0")
    codes = unpack_codes(data[_U32.size + 4 * blocks :], 1, count)
    return _block_signed(codes, scales, block, reference)


def _block_signed(codes: np.ndarray, scales: np.ndarray, block: int, reference: np.ndarray) -> np.ndarray:
    magnitude = np.repeat(scales, block)[: codes.size]
    step = np.where(codes.astype(bool), magnitude, -magnitude).astype(np.float32)
    return np.add(reference.reshape(-1), step, dtype=np.float32).reshape(reference.shape)


# --------------------------------------------------------------- zero-level grid, step from the RMS
def encode_midtread(diff: np.ndarray, reference: np.ndarray, bits: int, step_factor: float) -> tuple[bytes, np.ndarray]:
    """``diff`` as codes ``-h..h`` of one step, ``step_factor`` times its RMS (clipped beyond ``h``): the data and the rebuilt tensor."""
    flat = diff.reshape(-1)
    rms = math.sqrt(float(np.square(flat, dtype=np.float64).mean())) if flat.size else 0.0
    if not math.isfinite(rms):
        raise ValueError("innovation g - qhat is not finite")
    step = np.float32(step_factor * rms)
    half = _half(bits)
    if step > 0:
        signed = np.clip(np.rint(np.divide(flat, step, dtype=np.float32)), -half, half)
        codes = (signed + half).astype(np.uint8)
    else:
        codes = np.full(flat.size, half, np.uint8)
    return _F32.pack(float(step)) + pack_codes(codes, bits), _midtread(codes, step, half, reference)


def decode_midtread(data: bytes, reference: np.ndarray, bits: int) -> np.ndarray:
    count = reference.size
    expected = _F32.size + packed_nbytes(count, bits)
    if len(data) != expected:
        raise LeverError(f"m{bits} data is {len(data)} bytes, expected {expected}")
    (step,) = _F32.unpack_from(data)
    if not (math.isfinite(step) and step >= 0):
        raise LeverError(f"step must be finite and >= 0, got {step}")
    half = _half(bits)
    codes = unpack_codes(data[_F32.size :], bits, count)
    if (codes > 2 * half).any():
        raise LeverError(f"m{bits} code above {2 * half}")
    return _midtread(codes, np.float32(step), half, reference)


def _half(bits: int) -> int:
    return (1 << (bits - 1)) - 1


def _midtread(codes: np.ndarray, step: np.float32, half: int, reference: np.ndarray) -> np.ndarray:
    """``reference + step * (codes - half)``: exact small integers times a float32, the same ops on both ends."""
    level = np.subtract(codes, np.float32(half), dtype=np.float32)
    np.multiply(level, step, out=level)
    return np.add(reference.reshape(-1), level, dtype=np.float32).reshape(reference.shape)


# --------------------------------------------------------------- low-rank factors
def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """A tensor read as a matrix: its first dimension by the product of the rest."""
    return int(shape[0]), math.prod(int(d) for d in shape[1:])


def low_rank_fits(shape: tuple[int, ...], rank: int) -> bool:
    """Whether a tensor of ``shape`` travels as rank-``rank`` factors (``LOW_RANK_SHARE``)."""
    if rank < 1 or len(shape) < 2:
        return False
    rows, cols = matrix_shape(shape)
    return rank * (rows + cols) <= LOW_RANK_SHARE * rows * cols


def encode_low_rank(diff: np.ndarray, reference: np.ndarray, rank: int) -> tuple[bytes, np.ndarray]:
    """``diff``'s best rank-``rank`` approximation as two int8 factors and one float32 scale: the data and the rebuilt tensor."""
    rows, cols = matrix_shape(diff.shape)
    matrix = diff.reshape(rows, cols).astype(np.float64)
    if not np.isfinite(matrix).all():
        raise ValueError("innovation g - qhat is not finite")
    left, right = _factors(matrix, rank)
    left_codes, left_scale = _int8(left)
    right_codes, right_scale = _int8(right)
    scale = np.float32(left_scale * right_scale)
    data = _F32.pack(float(scale)) + left_codes.tobytes() + right_codes.tobytes()
    return data, _low_rank(left_codes, right_codes, scale, reference)


def decode_low_rank(data: bytes, reference: np.ndarray, rank: int) -> np.ndarray:
    rows, cols = matrix_shape(reference.shape)
    expected = _F32.size + rank * (rows + cols)
    if len(data) != expected:
        raise LeverError(f"l{rank} data is {len(data)} bytes, expected {expected}")
    (scale,) = _F32.unpack_from(data)
    if not (math.isfinite(scale) and scale >= 0):
        raise LeverError(f"scale must be finite and >= 0, got {scale}")
    codes = np.frombuffer(data, np.int8, offset=_F32.size)
    if (codes == -128).any():
        raise LeverError("an int8 factor code is -128 (codes are -127..127)")
    left, right = codes[: rows * rank].reshape(rows, rank), codes[rows * rank :].reshape(cols, rank)
    return _low_rank(left, right, np.float32(scale), reference)


def _factors(matrix: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Factors L (rows x rank), R (cols x rank) whose product is ``matrix``'s best rank-``rank``
    approximation (a seeded randomised range finder with power iterations), each scaled by the
    square roots of the singular values. The thin factorisations go through Gram matrices of
    ``rank + _OVERSAMPLE`` columns (float64): LAPACK's QR and SVD of a 3136 x 12 matrix took
    most of the encoding's time."""
    rows, cols = matrix.shape
    sketch = np.random.default_rng(0).standard_normal((cols, rank + _OVERSAMPLE))
    basis = _orthonormal(matrix @ sketch)
    for _ in range(_POWER_ITERATIONS):
        basis = _orthonormal(matrix @ _orthonormal(matrix.T @ basis))
    small = basis.T @ matrix  # basis @ small is matrix projected on the range found
    energy, turn = np.linalg.eigh(small @ small.T)  # small = turn diag(s) V^T with s^2 = energy
    top = np.argsort(energy)[::-1][:rank]
    singular = np.sqrt(np.clip(energy[top], 0.0, None))
    live = singular > singular.max(initial=0.0) * 1e-9
    left, right = np.zeros((rows, rank)), np.zeros((cols, rank))
    root = np.sqrt(singular[live])
    left[:, : live.sum()] = (basis @ turn[:, top[live]]) * root
    right[:, : live.sum()] = (small.T @ turn[:, top[live]]) / root
    return left, right


def _orthonormal(columns: np.ndarray) -> np.ndarray:
    """An orthonormal basis of ``columns``' span (through their Gram matrix; directions ~1e-12 below the largest dropped)."""
    energy, turn = np.linalg.eigh(columns.T @ columns)
    keep = energy > energy.max(initial=0.0) * 1e-12
    return columns @ (turn[:, keep] / np.sqrt(energy[keep]))


def _int8(values: np.ndarray) -> tuple[np.ndarray, float]:
    """Codes -127..127 of one scale (the largest magnitude over 127) and that scale."""
    scale = float(np.abs(values).max(initial=0.0)) / 127
    if scale == 0:
        return np.zeros(values.shape, np.int8), 0.0
    return np.rint(values / scale).astype(np.int8), scale


def _low_rank(left: np.ndarray, right: np.ndarray, scale: np.float32, reference: np.ndarray) -> np.ndarray:
    """``reference + scale * left @ right.T``. The integer product is exact in float64 whatever the
    summation order (and in float32 below ``MAX_RANK``), so both ends rebuild the same bits."""
    product = (left.astype(np.float64) @ right.astype(np.float64).T).astype(np.float32)
    np.multiply(product, scale, out=product)
    return np.add(reference.reshape(product.shape), product, dtype=np.float32).reshape(reference.shape)


# --------------------------------------------------------------- top-k
def encode_topk(diff: np.ndarray, reference: np.ndarray, fraction: float, bits: int) -> tuple[bytes, np.ndarray]:
    """The ``fraction`` of ``diff`` largest in magnitude (at least one value), positions and ``bits``-bit values."""
    flat = diff.reshape(-1)
    if not np.isfinite(flat).all():
        raise ValueError("innovation g - qhat is not finite")
    kept = max(1, math.ceil(fraction * flat.size)) if flat.size else 0
    order = np.argpartition(np.abs(flat), flat.size - kept)[flat.size - kept :] if kept < flat.size else np.arange(flat.size)
    positions = np.sort(order)
    mode, index = encode_positions(positions, flat.size)
    ref_flat = np.ascontiguousarray(reference.reshape(-1))
    target = np.add(ref_flat[positions], flat[positions], dtype=np.float32)
    values, rebuilt_values = _encode_values(target, ref_flat[positions], bits)
    rebuilt = ref_flat.copy()
    rebuilt[positions] = rebuilt_values
    return _TOPK_HEADER.pack(kept, mode, len(index)) + index + values, rebuilt.reshape(reference.shape)


def decode_topk(data: bytes, reference: np.ndarray, bits: int) -> np.ndarray:
    count = reference.size
    if len(data) < _TOPK_HEADER.size:
        raise LeverError("top-k data shorter than its header")
    kept, mode, index_bytes = _TOPK_HEADER.unpack_from(data)
    if kept > count or index_bytes > len(data) - _TOPK_HEADER.size:
        raise LeverError(f"top-k header ({kept} kept, {index_bytes} index bytes) does not fit {count} values")
    start = _TOPK_HEADER.size + index_bytes
    positions = decode_positions(mode, data[_TOPK_HEADER.size : start], kept, count)
    ref_flat = np.ascontiguousarray(reference.reshape(-1))
    rebuilt = ref_flat.copy()
    rebuilt[positions] = _decode_values(data[start:], ref_flat[positions], bits)
    return rebuilt.reshape(reference.shape)


def _encode_values(target: np.ndarray, reference: np.ndarray, bits: int) -> tuple[bytes, np.ndarray]:
    """Kept values (``target``, against ``reference``) at ``bits``: the bytes and what the receiver rebuilds."""
    if bits == 32:
        diff = np.subtract(target, reference, dtype=np.float32)
        return diff.astype("<f4").tobytes(), np.add(reference, diff, dtype=np.float32)
    if bits == 1:
        diff = np.subtract(target, reference, dtype=np.float32)
        scale = np.float32(np.abs(diff, dtype=np.float64).mean()) if diff.size else np.float32(0)
        codes = (diff >= 0).astype(np.uint8)
        return _F32.pack(float(scale)) + pack_codes(codes, 1), _block_signed(codes, np.array([scale], np.float32), max(1, diff.size), reference)
    quantized = quantize_innovation(target, reference, bits)
    return _F32.pack(quantized.radius) + pack_codes(quantized.codes, bits), dequantize(quantized, reference)


def _decode_values(data: bytes, reference: np.ndarray, bits: int) -> np.ndarray:
    kept = reference.size
    expected = 4 * kept if bits == 32 else _F32.size + packed_nbytes(kept, bits)
    if len(data) != expected:
        raise LeverError(f"top-k values are {len(data)} bytes, expected {expected}")
    if bits == 32:
        diff = np.frombuffer(data, "<f4").astype(np.float32)
        if not np.isfinite(diff).all():
            raise LeverError("top-k values must be finite")
        return np.add(reference, diff, dtype=np.float32)
    (radius,) = _F32.unpack_from(data)
    if not (math.isfinite(radius) and radius >= 0):
        raise LeverError(f"radius must be finite and >= 0, got {radius}")
    codes = unpack_codes(data[_F32.size :], bits, kept)
    if bits == 1:
        return _block_signed(codes, np.array([radius], np.float32), max(1, kept), reference)
    return dequantize(QuantizedTensor(codes, radius, bits), reference)


def encode_positions(positions: np.ndarray, count: int) -> tuple[int, bytes]:
    """Sorted positions in ``0..count-1`` as a bitmap or as delta-coded varints, whichever is smaller."""
    bitmap_bytes = -(-count // 8)
    deltas = np.diff(positions.astype(np.uint64), prepend=np.uint64(0))
    varints = varint_encode(deltas) if positions.size * 1 < bitmap_bytes else None  # one byte each at least
    if varints is not None and len(varints) < bitmap_bytes:
        return _VARINT, varints
    mask = np.zeros(count, np.uint8)
    mask[positions] = 1
    return _BITMAP, np.packbits(mask, bitorder="little").tobytes()


def decode_positions(mode: int, data: bytes, kept: int, count: int) -> np.ndarray:
    if mode == _BITMAP:
        if len(data) != -(-count // 8):
            raise LeverError(f"bitmap is {len(data)} bytes, expected {-(-count // 8)}")
        bits = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")
        if bits[count:].any():
            raise LeverError("bitmap sets bits past the tensor's end")
        positions = np.flatnonzero(bits[:count])
    elif mode == _VARINT:
        deltas = varint_decode(data, kept)
        if kept and ((deltas[1:] == 0).any() or (deltas >= count).any()):
            raise LeverError("varint positions must increase and stay inside the tensor")
        positions = np.cumsum(deltas, dtype=np.uint64).astype(np.int64)
        if kept and positions[-1] >= count:
            raise LeverError("varint positions run past the tensor's end")
    else:
        raise LeverError(f"unknown index coding {mode}")
    if positions.size != kept:
        raise LeverError(f"index holds {positions.size} positions, the header says {kept}")
    return positions


def varint_encode(values: np.ndarray) -> bytes:
    """Unsigned LEB128 of each value (7 bits a byte, high bit: more follow), vectorised."""
    values = values.astype(np.uint64)
    if not values.size:
        return b""
    lengths = np.ones(values.size, np.int64)
    for j in range(1, 10):
        lengths += (values >> np.uint64(7 * j)) > 0
    starts = np.cumsum(lengths) - lengths
    out = np.zeros(int(lengths.sum()), np.uint8)
    for j in range(int(lengths.max())):
        rows = lengths > j
        byte = ((values[rows] >> np.uint64(7 * j)) & np.uint64(0x7F)).astype(np.uint8)
        out[starts[rows] + j] = byte | np.where(lengths[rows] > j + 1, 0x80, 0).astype(np.uint8)
    return out.tobytes()


def varint_decode(data: bytes, count: int) -> np.ndarray:
    """Inverse of ``varint_encode`` for exactly ``count`` values below 2**35; ``LeverError`` otherwise."""
    raw = np.frombuffer(data, np.uint8)
    if raw.size and raw[-1] & 0x80:
        raise LeverError("varints end inside a value")
    ends = np.flatnonzero((raw & 0x80) == 0)
    if ends.size != count:
        raise LeverError(f"{ends.size} varints, expected {count}")
    if not count:
        return np.zeros(0, np.uint64)
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > 5:
        raise LeverError("a varint position longer than 5 bytes")
    values = np.zeros(count, np.uint64)
    for j in range(int(lengths.max())):
        rows = lengths > j
        values[rows] |= (raw[starts[rows] + j] & 0x7F).astype(np.uint64) << np.uint64(7 * j)
    return values


# --------------------------------------------------------------- entropy coding
def compress(array: Array) -> Array:
    """``array`` with its data zstd-compressed (dtype ``z<dtype>``), or as it was where that is not smaller."""
    packed = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(array.data)
    if len(packed) >= len(array.data):
        return array
    return Array(dtype="z" + array.dtype, shape=tuple(array.shape), stype=array.stype, data=packed)


def decompress(data: bytes, limit: int) -> bytes:
    """The zstd frame's content, refused (``LeverError``) if it declares none or more than ``limit`` bytes."""
    try:
        size = zstandard.frame_content_size(data)
        if size < 0 or size > limit:
            raise LeverError(f"zstd frame declares {size} bytes, at most {limit} expected")
        return zstandard.ZstdDecompressor().decompress(data, max_output_size=limit)
    except zstandard.ZstdError as err:
        raise LeverError(f"zstd data does not decode: {err}") from None


def payload_limit(count: int) -> int:
    """The most bytes any coded payload of ``count`` values takes (top-k at 32 bits with varint positions)."""
    return 9 * count + 64


# --------------------------------------------------------------- bit budgets
def allocate_widths(stats: dict[str, tuple[int, float, float, float]], budget_bits: float) -> dict[str, int]:
    """Widths from ``BUDGET_WIDTHS`` per key, at most ``budget_bits`` value bits per value in total.

    ``stats``: key -> (values, sum of squares, sum of magnitudes, largest
    magnitude) of the difference it will send. The quantisation error a width
    leaves is estimated from them: 1 bit (sign and mean magnitude) leaves
    exactly ``sum d^2 - (sum |d|)^2 / n``; ``b`` bits on the LAQ grid about
    ``n R^2 / (3 (2^b - 1)^2)``. The widths with the least total error within
    the budget are found over the Pareto front of (bits, error) of the keys
    taken so far, exactly up to ``_FRONT`` points (a greedy pass would let a bias's 8 bits block the
    upgrade of the large tensor the budget was meant for).
    """
    keys = sorted(stats)
    cap = budget_bits * sum(stats[key][0] for key in keys)
    front: list[tuple[int, float, tuple[int, ...]]] = [(0, 0.0, ())]
    for key in keys:
        n = stats[key][0]
        grown = sorted(
            (bits + width * n, error + _width_error(stats[key], width), choice + (width,))
            for bits, error, choice in front for width in BUDGET_WIDTHS if bits + width * n <= cap
        )
        front = []
        for point in grown:  # keep the points no cheaper point beats
            if not front or point[1] < front[-1][1]:
                front.append(point)
        if len(front) > _FRONT:  # many tensors: the least error in each of _FRONT slices of the budget
            kept = {int(point[0] * _FRONT / cap): point for point in front}
            front = sorted(kept.values())
    if not front:
        return {key: BUDGET_WIDTHS[0] for key in keys}
    return dict(zip(keys, front[-1][2]))


#: Points of the Pareto front kept per tensor (exact below it; a model of 60 tensors is allocated in milliseconds).
_FRONT = 256


def _width_error(stat: tuple[int, float, float, float], bits: int) -> float:
    n, squares, magnitudes, largest = stat
    if bits == 1:
        return max(squares - magnitudes * magnitudes / max(n, 1), 0.0)
    return n * largest * largest / (3.0 * ((1 << bits) - 1) ** 2)
