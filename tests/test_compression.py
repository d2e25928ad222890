"""LAQ quantizer, bit packing and the quantised-tensor format on the LAQ grid (fedlayer.wire)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as RecordDictProto
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedlayer.layers import squared_distance
from fedlayer.traffic.size import object_tree_bytes
from fedlayer.wire.bitpack import pack_codes, packed_nbytes, unpack_codes
from fedlayer.wire.quantize import QuantizedTensor, dequantize, quantize_innovation
from fedlayer.wire.tensors import CODEC_STYPE, CodecError, decode_tensor, encode_grid, encode_tensor, grid_bits
from tests.conftest import fuzz_examples

ALL_BITS = range(1, 9)
LENGTHS = (0, 1, 7, 13, 1001)


def _reference_pack(codes: np.ndarray, bits: int) -> bytes:
    """The documented layout, spelled out with an explicit (count, bits) bit matrix."""
    matrix = (codes.reshape(-1, 1) >> np.arange(bits, dtype=np.uint8)) & 1
    return np.packbits(matrix.reshape(-1), bitorder="little").tobytes()


def _tolerance(g: np.ndarray, qhat: np.ndarray, radius: float) -> float:
    """Float32 slack on top of delta: a few ulps of the largest magnitude involved."""
    scale = radius + float(np.abs(g).max(initial=0)) + float(np.abs(qhat).max(initial=0))
    return 4e-6 * scale + 1e-38


# --- bit packing -------------------------------------------------------------


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("count", LENGTHS)
def test_pack_round_trip_and_layout(bits: int, count: int) -> None:
    rng = np.random.default_rng(bits * 10_000 + count)
    codes = rng.integers(0, 2**bits, size=count, dtype=np.uint8)
    packed = pack_codes(codes, bits)
    assert len(packed) == packed_nbytes(count, bits) == math.ceil(count * bits / 8)
    assert packed == _reference_pack(codes, bits)
    out = unpack_codes(packed, bits, count)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, codes)


def test_pack_little_endian_bit_order() -> None:
    # codes 1, 2, 3 at 2 bits: stream bits 10 01 11 (LSB first) -> 0b00_11_10_01
    assert pack_codes(np.array([1, 2, 3], dtype=np.uint8), 2) == bytes([0b00111001])


def test_pack_accepts_any_shape_in_c_order() -> None:
    codes = np.arange(24, dtype=np.uint8).reshape(2, 3, 4) % 8
    assert pack_codes(codes, 3) == pack_codes(codes.reshape(-1), 3)


@pytest.mark.parametrize("bits", [0, 9, -1])
def test_bits_out_of_range(bits: int) -> None:
    with pytest.raises(ValueError, match="bits"):
        pack_codes(np.zeros(4, dtype=np.uint8), bits)
    with pytest.raises(ValueError, match="bits"):
        unpack_codes(b"\x00", bits, 1)


@pytest.mark.parametrize("delta", [-1, 1])
def test_unpack_rejects_wrong_length(delta: int) -> None:
    packed = pack_codes(np.ones(13, dtype=np.uint8), 3)
    bad = packed[:-1] if delta < 0 else packed + b"\x00"
    with pytest.raises(ValueError, match="bytes"):
        unpack_codes(bad, 3, 13)


def test_pack_rejects_codes_wider_than_bits() -> None:
    with pytest.raises(ValueError, match="exceed"):
        pack_codes(np.array([0, 8], dtype=np.uint8), 3)
    with pytest.raises(TypeError):
        pack_codes(np.array([0, 1], dtype=np.int64), 3)


@settings(max_examples=fuzz_examples(200), deadline=None)
@given(bits=st.integers(1, 8), data=st.data())
def test_pack_round_trip_property(bits: int, data: st.DataObject) -> None:
    codes = data.draw(
        hnp.arrays(np.uint8, st.integers(0, 300), elements=st.integers(0, 2**bits - 1))
    )
    packed = pack_codes(codes, bits)
    assert len(packed) == math.ceil(codes.size * bits / 8)
    np.testing.assert_array_equal(unpack_codes(packed, bits, codes.size), codes)


# --- quantizer ---------------------------------------------------------------


def _check_quantization(g: np.ndarray, qhat: np.ndarray, bits: int) -> None:
    qt = quantize_innovation(g, qhat, bits)
    q = dequantize(qt, qhat)
    max_code = 2**bits - 1
    radius = float(np.abs(g.astype(np.float64) - qhat).max(initial=0))
    delta = qt.radius / max_code
    tol = _tolerance(g, qhat, qt.radius)

    assert qt.codes.dtype == np.uint8 and qt.codes.shape == g.shape
    assert int(qt.codes.max(initial=0)) <= max_code
    assert q.dtype == np.float32 and q.shape == g.shape
    assert float(np.float32(qt.radius)) == qt.radius  # travels as float32 unchanged
    assert qt.radius == pytest.approx(radius, rel=1e-6, abs=1e-38)
    assert np.all(np.abs(q.astype(np.float64) - g) <= delta + tol)
    # The innovation never leaves the [-R, R] box around qhat.
    assert np.all(np.abs(q.astype(np.float64) - qhat) <= qt.radius + tol)
    # Q moves toward g: the inf-norm distance shrinks by a factor 2^b - 1.
    dist_after = float(np.abs(q.astype(np.float64) - g).max(initial=0))
    assert dist_after <= radius / max_code + tol
    # In L2 that only follows when n * delta^2 < R^2, i.e. n < (2^b - 1)^2.
    # (Skipped for subnormal delta: float32 has too few digits there to step.)
    if delta >= np.finfo(np.float32).tiny and g.size < max_code**2:
        assert squared_distance(q, g) < squared_distance(qhat, g)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("shape", [(), (1,), (7,), (13, 3), (4, 5, 6)])
def test_quantize_bounds(bits: int, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(bits)
    g = rng.standard_normal(shape).astype(np.float32)
    qhat = (g + 0.3 * rng.standard_normal(shape)).astype(np.float32)
    _check_quantization(g, qhat, bits)


def test_values_on_the_grid_are_lossless() -> None:
    # g - qhat on the grid itself: quantization is lossless.
    qhat = np.zeros(4, dtype=np.float32)
    g = np.array([-3.0, -1.0, 1.0, 3.0], dtype=np.float32)
    qt = quantize_innovation(g, qhat, 2)
    np.testing.assert_array_equal(qt.codes, [0, 1, 2, 3])
    np.testing.assert_array_equal(dequantize(qt, qhat), g)
    assert qt.radius == 3.0


def test_l2_distance_can_grow_at_one_bit() -> None:
    """Why the 'moves toward g' guarantee is stated in the inf-norm.

    With b = 1 the levels are qhat +- R, so every coordinate with no innovation
    is pushed a full R away: ||Q - g||^2 = (n - 1) R^2 > R^2 = ||qhat - g||^2.
    """
    g = np.array([1.0, 0.0, 0.0, 0.0], dtype=np.float32)
    qhat = np.zeros(4, dtype=np.float32)
    q = dequantize(quantize_innovation(g, qhat, 1), qhat)
    assert squared_distance(q, g) == 3.0 > squared_distance(qhat, g) == 1.0


@pytest.mark.parametrize("bits", ALL_BITS)
def test_zero_innovation(bits: int) -> None:
    g = np.linspace(-2, 2, 11, dtype=np.float32).reshape(11, 1)
    qt = quantize_innovation(g, g.copy(), bits)
    assert qt.radius == 0.0
    np.testing.assert_array_equal(qt.codes, np.zeros((11, 1), dtype=np.uint8))
    np.testing.assert_array_equal(dequantize(qt, g), g)


def test_empty_tensor() -> None:
    g = np.zeros((0, 3), dtype=np.float32)
    qt = quantize_innovation(g, g, 4)
    assert qt.radius == 0.0 and qt.codes.shape == (0, 3)
    assert dequantize(qt, g).shape == (0, 3)


def test_subnormal_radius_does_not_overflow() -> None:
    qhat = np.zeros(3, dtype=np.float32)
    g = np.array([1e-45, 0.0, -1e-45], dtype=np.float32)
    qt = quantize_innovation(g, qhat, 8)
    assert qt.radius > 0
    assert np.all(np.isfinite(dequantize(qt, qhat)))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_rejected(bad: float) -> None:
    g = np.array([0.0, bad], dtype=np.float32)
    with pytest.raises(ValueError, match="finite"):
        quantize_innovation(g, np.zeros(2, dtype=np.float32), 4)


def test_shape_mismatch_rejected() -> None:
    with pytest.raises(ValueError, match="shape"):
        quantize_innovation(np.zeros(3, np.float32), np.zeros(4, np.float32), 4)
    qt = QuantizedTensor(np.zeros(3, np.uint8), 1.0, 4)
    with pytest.raises(ValueError, match="shape"):
        dequantize(qt, np.zeros((3, 1), np.float32))


finite_f32 = st.floats(-1e6, 1e6, width=32, allow_nan=False, allow_infinity=False)


@settings(max_examples=fuzz_examples(300), deadline=None)
@given(
    bits=st.integers(1, 8),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=9),
    data=st.data(),
)
def test_quantize_property(bits: int, shape: tuple[int, ...], data: st.DataObject) -> None:
    g = data.draw(hnp.arrays(np.float32, shape, elements=finite_f32))
    qhat = data.draw(hnp.arrays(np.float32, shape, elements=finite_f32))
    _check_quantization(g, qhat, bits)


# --- the quantised-tensor format on the LAQ grid ---------------------------------


def _over_the_wire(arrays: dict[str, Array]) -> dict[str, Array]:
    """``arrays`` serialised as Flower sends a record, and parsed back."""
    data = recorddict_to_proto(RecordDict({"coded": ArrayRecord(arrays)})).SerializeToString()
    parsed = RecordDictProto()
    parsed.ParseFromString(data)
    return dict(recorddict_from_proto(parsed)["coded"].items())


@pytest.mark.parametrize("bits", ALL_BITS)
def test_grid_tensor_layout_and_decode(bits: int) -> None:
    rng = np.random.default_rng(7)
    g = rng.standard_normal((13, 7)).astype(np.float32)
    qhat = rng.standard_normal((13, 7)).astype(np.float32)
    array, q = encode_grid(g, qhat, bits)

    assert (array.stype, array.dtype, tuple(array.shape)) == (CODEC_STYPE, f"q{bits}", (13, 7))
    assert grid_bits(array) == bits
    # a float32 radius, then the bit-packed codes: nothing else
    radius = float(np.frombuffer(array.data[:4], "<f4")[0])
    assert radius == float(np.float32(np.abs(g.astype(np.float64) - qhat).max()))
    assert len(array.data) == 4 + math.ceil(g.size * bits / 8)
    codes = quantize_innovation(g, qhat, bits).codes
    assert array.data[4:] == pack_codes(codes, bits)
    # the receiver rebuilds the sender's Q bit for bit
    received = _over_the_wire({"w": array})["w"]
    np.testing.assert_array_equal(decode_tensor(received, qhat).view(np.uint32), q.view(np.uint32))
    assert np.max(np.abs(q.astype(np.float64) - g)) <= radius / (2**bits - 1) * (1 + 1e-5)


def test_one_bit_grid_and_sign_are_two_encodings() -> None:
    """LAQ's 1-bit grid (``q1``: ``qhat +- R``, R the largest difference) is not the codec's
    1-bit sign (``s1``: ``ref +- mean |d|``); each decodes as itself."""
    qhat = np.zeros(4, np.float32)
    g = np.array([1.0, -0.5, 0.25, -0.25], np.float32)
    grid, q_grid = encode_grid(g, qhat, 1)
    sign, q_sign = encode_tensor(g, qhat, 1)
    assert (grid.dtype, sign.dtype) == ("q1", "s1") and grid_bits(sign) is None
    np.testing.assert_array_equal(q_grid, [1.0, -1.0, 1.0, -1.0])
    np.testing.assert_array_equal(q_sign, [0.5, -0.5, 0.5, -0.5])
    np.testing.assert_array_equal(decode_tensor(grid, qhat), q_grid)
    np.testing.assert_array_equal(decode_tensor(sign, qhat), q_sign)


def test_no_innovation_rebuilds_the_reference_exactly() -> None:
    qhat = np.linspace(-3, 3, 5, dtype=np.float32)
    array, q = encode_grid(qhat.copy(), qhat, 4)
    assert array.data[:4] == bytes(4)  # R = 0
    np.testing.assert_array_equal(q, qhat)
    np.testing.assert_array_equal(decode_tensor(array, qhat), qhat)


def test_a_coded_tensor_is_about_an_eighth_of_float32_at_4_bits() -> None:
    """Measured as the ledger measures: the serialised Array with its chunk, framing included
    (dtype, shape, stype, the chunk's id and length: under 200 bytes a tensor)."""
    g = np.random.default_rng(2).standard_normal(10_000).astype(np.float32)
    coded, _ = encode_grid(g, np.zeros_like(g), 4)
    assert len(coded.data) == 4 + 5000
    assert 0 < object_tree_bytes(coded) - len(coded.data) < 200
    assert 7.5 < object_tree_bytes(Array(g)) / object_tree_bytes(coded) < 8


@settings(max_examples=fuzz_examples(100), deadline=None)
@given(
    bits=st.integers(1, 8),
    shapes=st.lists(
        hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=8), min_size=1, max_size=4
    ),
    seed=st.integers(0, 2**32 - 1),
    scale=st.sampled_from([1e-30, 1e-3, 1.0, 1e6]),
)
def test_receiver_reconstructs_q_bit_exactly(
    bits: int, shapes: list[tuple[int, ...]], seed: int, scale: float
) -> None:
    """encode -> serialised record -> decode gives the receiver the sender's exact Q."""
    rng = np.random.default_rng(seed)
    sent, qhats, qs = {}, {}, {}
    for i, shape in enumerate(shapes):
        name = f"t{i}"
        qhats[name] = (scale * rng.standard_normal(shape)).astype(np.float32)
        g = (scale * rng.standard_normal(shape)).astype(np.float32)
        sent[name], qs[name] = encode_grid(g, qhats[name], bits)
    for name, array in _over_the_wire(sent).items():
        q = decode_tensor(array, qhats[name])
        np.testing.assert_array_equal(q.view(np.uint32), qs[name].view(np.uint32))


DTYPES = ["q0", "q1", "q3", "q4", "q8", "q9", "s1", "f16", "float32", "", "q\xff"]


def _expected_length(dtype: str, count: int) -> int:
    """The data length a well-formed Array of ``dtype`` needs (what the fuzzed sender aims near)."""
    if dtype == "f16":
        return 2 * count
    bits = int(dtype[1:]) if dtype[1:].isdigit() else 1
    return 4 + math.ceil(count * bits / 8)


@settings(max_examples=fuzz_examples(1000), deadline=None)
@given(
    dtype=st.sampled_from(DTYPES),
    reference_shape=st.sampled_from([(3, 5), (15,), ()]),
    same_shape=st.booleans(),
    other_shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6),
    length_offset=st.sampled_from([-1, 0, 0, 0, 1, 9]),
    data=st.data(),
)
def test_hostile_arrays_only_raise_codec_error(
    dtype: str,
    reference_shape: tuple[int, ...],
    same_shape: bool,
    other_shape: tuple[int, ...],
    length_offset: int,
    data: st.DataObject,
) -> None:
    """Whatever a sender declares and holds (near-valid lengths, any radius bits), decoding either
    refuses it (``CodecError``) or rebuilds a float32 tensor of the reference's shape."""
    shape = reference_shape if same_shape else other_shape
    length = max(0, _expected_length(dtype, math.prod(shape)) + length_offset)
    payload = data.draw(st.binary(min_size=length, max_size=length))
    reference = np.ones(reference_shape, np.float32)
    array = Array(dtype=dtype, shape=shape, stype=CODEC_STYPE, data=payload)
    try:
        value = decode_tensor(array, reference)
    except CodecError:
        return
    assert value.shape == reference_shape and value.dtype == np.float32
