"""Dense bit packing of small integer codes (1..8 bits each).

Layout: code ``i`` occupies stream bits ``i*bits .. i*bits + bits - 1``, least
significant bit first, and stream bit ``k`` is bit ``k % 8`` of byte ``k // 8``
(little-endian bit order, as ``np.packbits(..., bitorder="little")``).  The
packed length is exactly ``ceil(count * bits / 8)``; unused high bits of the last
byte are zero.

Implementation: every group of 8 codes is one little-endian uint64 word with one
code per byte.  Three shift/mask steps squeeze the byte lanes to ``bits``-wide
lanes (8 -> 16-bit pairs -> 32-bit quads -> 64-bit octets), after which the low
``bits`` bytes of each word are exactly the packed stream for those 8 codes.
That is 12 vectorised uint64 passes instead of the 8x-inflated bit matrix that
``np.unpackbits``/``np.packbits`` would need.
"""

from __future__ import annotations

import numpy as np

_WORD = np.dtype("<u8")

# (lane width in bits, mask of the low half of every lane) for the three steps.
_STEPS = (
    (16, np.uint64(0x00FF00FF00FF00FF)),
    (32, np.uint64(0x0000FFFF0000FFFF)),
    (64, np.uint64(0x00000000FFFFFFFF)),
)


def packed_nbytes(count: int, bits: int) -> int:
    """Exact packed size in bytes of ``count`` codes of ``bits`` bits."""
    check_bits(bits)
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    return (count * bits + 7) // 8


def pack_codes(codes: np.ndarray, bits: int) -> bytes:
    """Pack uint8 ``codes`` (any shape, C order) into ``bits`` bits each.

    Raises ValueError if ``bits`` is outside 1..8 or a code does not fit in
    ``bits`` bits (it would silently corrupt its neighbours otherwise).
    """
    check_bits(bits)
    codes = np.asarray(codes)
    if codes.dtype != np.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    count = codes.size
    if count == 0:
        return b""
    if bits < 8 and int(codes.max()) >> bits:
        raise ValueError(f"codes exceed {bits} bits (max {int(codes.max())})")
    if bits == 8:
        return codes.tobytes()

    groups = -(-count // 8)
    buf = np.zeros(groups * 8, dtype=np.uint8)
    buf[:count] = codes.reshape(-1)
    words = buf.view(_WORD)
    high = np.empty_like(words)
    for step, (lane, low_mask) in enumerate(_STEPS):
        # The low half of each lane holds (1 << step) codes = bits << step bits;
        # slide the high half down so it sits right above them.
        shift = np.uint64(lane // 2 - (bits << step))
        np.bitwise_and(words, ~low_mask, out=high)
        np.bitwise_and(words, low_mask, out=words)
        np.right_shift(high, shift, out=high)
        np.bitwise_or(words, high, out=words)
    packed = words.view(np.uint8).reshape(groups, 8)[:, :bits]
    stream = np.ascontiguousarray(packed).reshape(-1)
    return stream[: packed_nbytes(count, bits)].tobytes()


def unpack_codes(data: bytes, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: a new 1-D uint8 array of ``count`` codes.

    Raises ValueError if ``bits`` is outside 1..8 or ``len(data)`` is not
    exactly ``ceil(count * bits / 8)``.
    """
    expected = packed_nbytes(count, bits)
    if len(data) != expected:
        raise ValueError(
            f"packed data is {len(data)} bytes, expected {expected} for {count} codes of {bits} bits"
        )
    raw = np.frombuffer(data, dtype=np.uint8)
    if bits == 8:
        return raw.copy()
    if count == 0:
        return np.zeros(0, dtype=np.uint8)

    groups = -(-count // 8)
    stream = np.zeros(groups * bits, dtype=np.uint8)
    stream[:expected] = raw
    buf = np.zeros((groups, 8), dtype=np.uint8)
    buf[:, :bits] = stream.reshape(groups, bits)
    words = buf.view(_WORD).reshape(-1)
    high = np.empty_like(words)
    for step in (2, 1, 0):
        lane, _ = _STEPS[step]
        width = bits << step  # bits held by each half-lane after this step is undone
        field_mask = _lane_low_bits(lane, width)
        np.right_shift(words, np.uint64(width), out=high)
        np.bitwise_and(high, field_mask, out=high)
        np.bitwise_and(words, field_mask, out=words)
        np.left_shift(high, np.uint64(lane // 2), out=high)
        np.bitwise_or(words, high, out=words)
    return words.view(np.uint8)[:count].copy()


def _lane_low_bits(lane: int, width: int) -> np.uint64:
    """Mask with the low ``width`` bits set in every ``lane``-bit lane of a uint64."""
    one_lane = (1 << width) - 1
    return np.uint64(sum(one_lane << offset for offset in range(0, 64, lane)))


def check_bits(bits: int) -> None:
    """Raise ValueError unless ``bits`` is an integer in 1..8."""
    if not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")
