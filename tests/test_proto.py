"""fedlayer.compressed.v1 wire format: generated code, round trip, strict validation."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlayer.wire.laq_codec import EncodedTensor, LAQCodec
from fedlayer.wire.laq_proto import (
    FORMAT_VERSION,
    DecodedUpdate,
    WireFormatError,
    decode_update,
    encode_update,
)
from fedlayer.wire.proto.fedlayer.compressed.v1 import update_pb2
from tests.conftest import fuzz_examples

REPO = Path(__file__).resolve().parents[1]
PROTO_ROOT = REPO / "fedlayer" / "wire" / "proto"
PROTO = PROTO_ROOT / "fedlayer" / "compressed" / "v1" / "update.proto"


@pytest.mark.parametrize("generated", ["update_pb2.py", "update_pb2.pyi"])
def test_committed_code_matches_schema(tmp_path: Path, generated: str) -> None:
    pytest.importorskip("grpc_tools")
    subprocess.run(
        [
            sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_ROOT}",
            f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", str(PROTO),
        ],
        check=True,
        cwd=REPO,
    )
    fresh = (tmp_path / "fedlayer" / "compressed" / "v1" / generated).read_bytes()
    committed = (PROTO.parent / generated).read_bytes()
    assert fresh == committed, (
        f"{generated} is stale or was made by another protoc; regenerate with "
        "python -m grpc_tools.protoc -I fedlayer/wire/proto --python_out=fedlayer/wire/proto "
        "--pyi_out=fedlayer/wire/proto fedlayer/wire/proto/fedlayer/compressed/v1/update.proto"
    )


def _encoded(name: str = "w", shape: tuple[int, ...] = (3, 5), bits: int = 4) -> EncodedTensor:
    g = np.random.default_rng(bits).standard_normal(shape).astype(np.float32)
    enc, _ = LAQCodec().encode(name, g, np.zeros(shape, np.float32), bits)
    return enc


def test_round_trip() -> None:
    tensors = [_encoded("a.weight", (4, 3), 2), _encoded("a.bias", (4,), 8), _encoded("s", (), 1)]
    data = encode_update(tensors, skip=False, clock=7, quantization_error=0.25)
    update = decode_update(data, expected={"a.weight": (4, 3), "a.bias": (4,), "s": ()})
    assert update == DecodedUpdate(FORMAT_VERSION, False, tuple(tensors), 7, 0.25)


def test_skip_round_trip() -> None:
    data = encode_update([], skip=True, clock=2, quantization_error=0.0)
    update = decode_update(data, expected={"w": (3, 5)})
    assert update.skip and update.tensors == () and update.clock == 2


def test_report_counts_exact_wire_bytes() -> None:
    tensors = [
        _encoded("conv1.weight", (8, 3, 3, 3), 3),
        _encoded("fc.bias", (300,), 8),
        _encoded("scale", (), 1),
        _encoded("empty", (0, 4), 2),  # no codes and R = 0: both fields omitted
        _encoded("\u00e9t\u00e9", (200, 200), 5),  # multi-byte name, 2-byte varints
    ]
    data = encode_update(tensors, skip=False, clock=0, quantization_error=0.0)
    envelope = 2  # format_version = 1; every other envelope field is default
    assert len(data) == envelope + sum(t.report.bytes_after for t in tensors if t.report)


def test_encoder_refuses_invalid_update() -> None:
    with pytest.raises(WireFormatError, match="skip"):
        encode_update([_encoded()], skip=True, clock=0, quantization_error=0.0)
    with pytest.raises(WireFormatError, match="duplicate"):
        encode_update([_encoded(), _encoded()], skip=False, clock=0, quantization_error=0.0)
    with pytest.raises(WireFormatError, match="quantization_error"):
        encode_update([], skip=False, clock=0, quantization_error=1e39)  # inf as float32


def _tensor_msg(**overrides: object) -> update_pb2.QuantizedTensor:
    fields: dict[str, object] = {
        "name": "w", "shape": [3, 5], "bits": 4, "radius": 1.5, "packed_codes": bytes(8),
    }
    fields.update(overrides)
    return update_pb2.QuantizedTensor(**fields)


def _update_bytes(*tensors: update_pb2.QuantizedTensor, **overrides: object) -> bytes:
    fields: dict[str, object] = {"format_version": FORMAT_VERSION, "tensors": list(tensors)}
    fields.update(overrides)
    return update_pb2.CompressedUpdate(**fields).SerializeToString()


def test_valid_baseline_for_malformed_cases() -> None:
    decode_update(_update_bytes(_tensor_msg()), expected={"w": (3, 5)})


@pytest.mark.parametrize(
    ("data", "match"),
    [
        pytest.param(b"\xff\xff\xff", "not a CompressedUpdate", id="garbage"),
        pytest.param(b"\x1a\x05\x0a\x03ab", "not a CompressedUpdate", id="truncated"),
        pytest.param(b"\x08\x01\x1a\x04\x0a\x02\xff\xfe", "not a CompressedUpdate", id="bad-utf8"),
        pytest.param(_update_bytes(format_version=0), "format_version", id="version-missing"),
        pytest.param(_update_bytes(format_version=2), "format_version", id="version-future"),
        pytest.param(_update_bytes(_tensor_msg(bits=0)), "bits", id="bits-0"),
        pytest.param(_update_bytes(_tensor_msg(bits=9)), "bits", id="bits-9"),
        pytest.param(_update_bytes(_tensor_msg(packed_codes=bytes(7))), "packed_codes", id="short"),
        pytest.param(_update_bytes(_tensor_msg(packed_codes=bytes(9))), "packed_codes", id="long"),
        pytest.param(_update_bytes(_tensor_msg(radius=math.nan)), "radius", id="radius-nan"),
        pytest.param(_update_bytes(_tensor_msg(radius=math.inf)), "radius", id="radius-inf"),
        pytest.param(_update_bytes(_tensor_msg(radius=-1.0)), "radius", id="radius-negative"),
        pytest.param(_update_bytes(_tensor_msg(), _tensor_msg()), "duplicate", id="duplicate"),
        pytest.param(
            _update_bytes(_tensor_msg(shape=[2**16, 2**16], packed_codes=b"")), "exceeds",
            id="absurd-size",
        ),
        pytest.param(_update_bytes(_tensor_msg(shape=[-1, 5])), "negative", id="negative-dim"),
        pytest.param(_update_bytes(_tensor_msg(shape=[1] * 33)), "dims", id="too-many-dims"),
        pytest.param(_update_bytes(_tensor_msg(name="")), "empty name", id="empty-name"),
        pytest.param(_update_bytes(_tensor_msg(), skip=True), "skip", id="skip-with-tensors"),
        pytest.param(
            _update_bytes(quantization_error=math.nan), "quantization_error", id="error-nan"
        ),
    ],
)
def test_malformed_rejected(data: bytes, match: str) -> None:
    with pytest.raises(WireFormatError, match=match):
        decode_update(data)


@pytest.mark.parametrize(
    ("expected", "match"),
    [
        pytest.param({"w": (5, 3)}, "shape", id="shape"),
        pytest.param({"w": (3, 5), "b": (5,)}, "missing", id="missing"),
        pytest.param({"v": (3, 5)}, "unexpected", id="renamed"),
        pytest.param({}, "unexpected", id="extra"),
    ],
)
def test_expected_names_and_shapes(expected: dict[str, tuple[int, ...]], match: str) -> None:
    with pytest.raises(WireFormatError, match=match):
        decode_update(_update_bytes(_tensor_msg()), expected=expected)


def test_wire_format_error_is_value_error() -> None:
    assert issubclass(WireFormatError, ValueError)
    with pytest.raises(TypeError):
        decode_update("not bytes")  # type: ignore[arg-type]


def _decode_or_reject(data: bytes, expected: dict[str, tuple[int, ...]] | None) -> None:
    try:
        update = decode_update(data, expected=expected)
    except WireFormatError:
        return
    codec = LAQCodec()
    for t in update.tensors:  # whatever validates must also decode
        assert codec.decode(t, np.zeros(t.shape, np.float32)).shape == t.shape


@settings(max_examples=fuzz_examples(2000), deadline=None)
@given(data=st.binary(max_size=200), with_expected=st.booleans())
def test_random_bytes_only_raise_wire_format_error(data: bytes, with_expected: bool) -> None:
    _decode_or_reject(data, {"w": (3, 5)} if with_expected else None)


@settings(max_examples=fuzz_examples(1000), deadline=None)
@given(
    base=st.sampled_from(
        [
            _update_bytes(_tensor_msg()),
            _update_bytes(_tensor_msg(shape=[9], bits=3, packed_codes=bytes(4)), client_clock=5),
        ]
    ),
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
)
def test_corrupted_updates_only_raise_wire_format_error(
    base: bytes, flips: list[tuple[int, int]]
) -> None:
    """Near-valid inputs reach the semantic checks, unlike most random bytes."""
    mutated = bytearray(base)
    for pos, value in flips:
        mutated[pos % len(mutated)] = value
    _decode_or_reject(bytes(mutated), None)
