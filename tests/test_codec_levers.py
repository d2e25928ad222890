"""The codec's levers (issue #26): 1-bit block scales, top-k, zstd, bit budgets, shared downloads, ``codec=`` presets."""

from __future__ import annotations

import math
import tempfile

import numpy as np
import pytest
import zstandard
from flwr.app import Array, ArrayRecord

from benchmarks.faults import codec_reply, push
from fedlayer.config import compose_config, load_config, resolve_resume
from fedlayer.errors import ConfigError
from fedlayer.layers import states_equal
from fedlayer.server.builder import build_strategy
from fedlayer.wire import levers
from fedlayer.wire.bitpack import packed_nbytes
from fedlayer.wire.levers import Encoding, allocate_widths, varint_decode, varint_encode
from fedlayer.wire.tensors import CODEC_STYPE, CodecError, check_encoding, decode_state, encode_state
from fedlayer.workload import load_workload
from tests.inprocess import FIRST_NODE_ID, SimulatedCrash, run_in_process
from tests.test_codec import WireCount
from tests.test_resume import _common, assert_same_run

COMMON = ["dataset=digits", "model=cnn", "federation.num_clients=4", "federation.rounds=3",
          "train.local_steps=5", "evaluation.max_examples=300"]


def _pair(count: int, seed: int = 0, scale: float = 1.0) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    reference = {"w": rng.standard_normal(count).astype(np.float32)}
    return {"w": reference["w"] + (scale * rng.standard_normal(count)).astype(np.float32)}, reference


def _round_trip(target: dict, reference: dict, encoding: Encoding) -> ArrayRecord:
    record, rebuilt, _ = encode_state(target, reference, encoding)
    check_encoding(record, reference, encoding, "up_bits")
    assert all(np.array_equal(decode_state(record, reference)[k], rebuilt[k]) for k in target)
    return record


# ------------------------------------------------------------------ exact byte counts
@pytest.mark.parametrize("count", [1, 7, 1001])
@pytest.mark.parametrize("block", [1, 64, 256])
def test_block_sign_round_trips_to_the_exact_byte_count(count, block):
    target, reference = _pair(count, count)
    record = _round_trip(target, reference, Encoding(1, block=block))
    assert record["w"].dtype == "s1b"
    assert len(record["w"].data) == 4 + 4 * math.ceil(count / block) + math.ceil(count / 8)  # block, scales, signs
    rebuilt = decode_state(record, reference)["w"]
    diff = target["w"] - reference["w"]
    for start in range(0, count, block):  # each block's step is its own mean magnitude
        part = slice(start, start + block)
        assert np.allclose(np.abs(rebuilt[part] - reference["w"][part]), np.abs(diff[part]).mean(), rtol=1e-5)


@pytest.mark.parametrize("bits", [32, 8, 4, 2, 1])
def test_top_k_round_trips_to_the_exact_byte_count_with_the_smaller_index(bits):
    count = 1000
    target, reference = _pair(count, 5, scale=0.01)
    positions = np.array([3, 90, 200, 201, 300, 400, 500, 600, 700, 800])  # gaps below 128: one varint byte each
    target["w"][positions] = reference["w"][positions] + np.linspace(1, 2, 10, dtype=np.float32) * np.array([1, -1] * 5)
    values = 4 * 10 if bits == 32 else 4 + packed_nbytes(10, bits)
    sparse = _round_trip(target, reference, Encoding(bits, topk=0.01))
    assert sparse["w"].dtype == f"k{bits}"
    assert len(sparse["w"].data) == 9 + 10 + values  # header, 10 varint positions (< the 125-byte bitmap), values
    rebuilt = decode_state(sparse, reference)["w"]
    assert np.array_equal(np.flatnonzero(rebuilt != reference["w"]), positions)
    dense = _round_trip(target, reference, Encoding(bits, topk=0.5))  # 500 positions: the bitmap is smaller
    values = 4 * 500 if bits == 32 else 4 + packed_nbytes(500, bits)
    assert len(dense["w"].data) == 9 + 125 + values


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_the_zero_level_grid_round_trips_to_the_exact_byte_count_and_clips_outliers(bits):
    count = 1001
    target, reference = _pair(count, bits, scale=0.01)
    target["w"][7] = reference["w"][7] + 50.0  # one outlier: the LAQ grid's step would be 100/(2^b - 1)
    record = _round_trip(target, reference, Encoding(bits, step=1.0))
    assert record["w"].dtype == f"m{bits}"
    assert len(record["w"].data) == 4 + packed_nbytes(count, bits)  # the float32 step, then the codes
    diff = (target["w"] - reference["w"]).astype(np.float64)
    step = np.float32(np.sqrt(np.mean(diff**2)))
    assert np.frombuffer(record["w"].data[:4], "<f4")[0] == step
    moved = decode_state(record, reference)["w"] - reference["w"]
    half = 2 ** (bits - 1) - 1
    assert np.allclose(moved / step, np.clip(np.rint(diff / step), -half, half), atol=1e-4)  # levels of one step
    if bits < 8:  # (at 8 bits 127 steps reach past any value of 1001: the RMS is at least the outlier / sqrt(1001))
        assert abs(moved[7]) == pytest.approx(half * step, rel=1e-5)  # the outlier clipped, the rest not coarsened
    assert step < 2.0  # the step follows the typical value (0.01), not the outlier (50)
    zero = _round_trip(reference, reference, Encoding(bits, step=1.0))  # no difference: every code on zero
    assert np.array_equal(decode_state(zero, reference)["w"], reference["w"])


def test_a_zero_level_code_past_the_grid_or_a_bad_step_is_refused():
    target, reference = _pair(16, 1)
    record = _round_trip(target, reference, Encoding(2, step=1.0))
    for data in (b"\xff" * 4 + record["w"].data[4:], record["w"].data[:4] + b"\xff" * 4, record["w"].data[:-1]):
        with pytest.raises(CodecError, match="m2"):  # code 3 lies past the grid's 2; a NaN step; a short payload
            decode_state(ArrayRecord({"w": type(record["w"])(dtype="m2", shape=(16,), stype=record["w"].stype, data=data)}),
                         reference)


def _low_rank_pair(rows: int, cols: int, rank: int, seed: int = 0, noise: float = 0.0) -> tuple[dict, dict]:
    """A reference and a target that differs from it by a rank-``rank`` matrix (plus ``noise``)."""
    rng = np.random.default_rng(seed)
    reference = {"w": rng.standard_normal((rows, cols)).astype(np.float32)}
    diff = rng.standard_normal((rows, rank)) @ rng.standard_normal((rank, cols)) * 0.01 + noise * rng.standard_normal((rows, cols))
    return {"w": reference["w"] + diff.astype(np.float32)}, reference


@pytest.mark.parametrize("rank", [1, 4])
def test_low_rank_factors_round_trip_to_the_exact_byte_count_and_carry_a_low_rank_difference(rank):
    target, reference = _low_rank_pair(96, 160, rank)
    record = _round_trip(target, reference, Encoding(2, rank=rank))
    assert record["w"].dtype == f"l{rank}"
    assert len(record["w"].data) == 4 + rank * (96 + 160)  # one float32 scale, then int8 factors
    diff = target["w"] - reference["w"]
    moved = decode_state(record, reference)["w"] - reference["w"]
    assert np.linalg.norm(moved - diff) < 0.02 * np.linalg.norm(diff)  # a difference of that rank arrives (int8 factors)
    zero = _round_trip(reference, reference, Encoding(2, rank=rank))
    assert np.array_equal(decode_state(zero, reference)["w"], reference["w"])


def test_low_rank_keeps_the_best_rank_r_part_and_owes_the_rest():
    target, reference = _low_rank_pair(64, 200, 2, seed=3, noise=0.002)
    diff = (target["w"] - reference["w"]).astype(np.float64)
    u, s, vt = np.linalg.svd(diff, full_matrices=False)
    best = (u[:, :2] * s[:2]) @ vt[:2]
    record, rebuilt, residual = encode_state(target, reference, Encoding(2, rank=2), {})
    moved = rebuilt["w"] - reference["w"]
    assert np.linalg.norm(moved - best) < 0.05 * np.linalg.norm(best)  # the top of the spectrum
    assert np.allclose(residual["w"], target["w"] - rebuilt["w"])  # what was left out is owed


def test_only_matrices_whose_factors_are_small_travel_as_factors():
    rng = np.random.default_rng(0)
    shapes = {"big": (64, 32, 5, 5), "square": (16, 16), "bias": (64,)}  # rank 4: 3456 <= 51200/8; 128 > 256/8
    reference = {k: rng.standard_normal(v).astype(np.float32) for k, v in shapes.items()}
    target = {k: v + 0.01 * rng.standard_normal(v.shape).astype(np.float32) for k, v in reference.items()}
    record = _round_trip(target, reference, Encoding(2, rank=4))
    assert {k: a.dtype for k, a in record.items()} == {"big": "l4", "square": "q2", "bias": "q2"}


def test_malformed_low_rank_factors_are_refused():
    target, reference = _low_rank_pair(40, 80, 2, seed=1)
    data = _round_trip(target, reference, Encoding(2, rank=2))["w"].data
    minus = data[:4] + b"\x80" + data[5:]  # int8 -128 lies outside the codes -127..127
    for dtype, payload, reason in (("l2", data[:-1], "bytes"), ("l2", b"\xff" * 4 + data[4:], "scale"),
                                   ("l2", minus, "-128"), ("l3", data, "bytes"), ("l65", data, "unknown")):
        array = Array(dtype=dtype, shape=(40, 80), stype=CODEC_STYPE, data=payload)
        with pytest.raises(CodecError, match=reason):
            decode_state(ArrayRecord({"w": array}), reference)


def test_varints_round_trip_and_malformed_ones_are_refused():
    values = np.array([0, 1, 127, 128, 16383, 16384, 2**32 - 1], np.uint64)
    data = varint_encode(values)
    assert len(data) == 1 + 1 + 1 + 2 + 2 + 3 + 5
    assert np.array_equal(varint_decode(data, len(values)), values)
    for bad, count in ((data[:-1], len(values)), (data, len(values) + 1), (b"\x80" * 6 + b"\x01", 1)):
        with pytest.raises(levers.LeverError):
            varint_decode(bad, count)


def test_zstd_round_trips_to_the_compressed_byte_count_and_keeps_what_does_not_shrink():
    target, reference = _pair(4096, 7, scale=0.0)
    target["w"][::97] += 1.0  # a sparse difference: 4-bit codes mostly at the grid's centre
    plain = _round_trip(target, reference, Encoding(4))
    zipped = _round_trip(target, reference, Encoding(4, entropy="zstd"))
    assert zipped["w"].dtype == "zq4"
    assert len(zipped["w"].data) == len(zstandard.ZstdCompressor(level=levers.ZSTD_LEVEL).compress(plain["w"].data))
    assert len(zipped["w"].data) < len(plain["w"].data) / 4
    noise, reference = _pair(64, 8)  # 64 random 8-bit codes: zstd cannot shrink them, the plain format travels
    assert _round_trip(noise, reference, Encoding(8, entropy="zstd"))["w"].dtype == "q8"


def test_a_bit_budget_spreads_widths_by_what_each_tensor_carries_and_costs_what_it_says():
    rng = np.random.default_rng(9)
    reference = {k: rng.standard_normal(2000).astype(np.float32) for k in ("moves", "still")}
    target = {"moves": reference["moves"] + rng.standard_normal(2000).astype(np.float32),
              "still": reference["still"] + 0.001 * rng.standard_normal(2000).astype(np.float32)}
    record = _round_trip(target, reference, Encoding(4, budget_bits=4.5))
    widths = {key: int(array.dtype[1:]) if array.dtype != "s1" else 1 for key, array in record.items()}
    assert widths == {"moves": 8, "still": 1}  # 9 bits a value over two tensors of 2000: the moving one gets 8
    assert sum(len(a.data) for a in record.values()) == sum(4 + packed_nbytes(2000, w) for w in widths.values())
    # the allocation is optimal, not greedy: a small tensor's cheap upgrade does not block the large one's
    stats = {"big": (10_000, 1e4, 8e3, 2.0), "small": (100, 1e2, 80.0, 1.0)}  # the small one's upgrade pays more a bit
    assert allocate_widths(stats, 1.995) == {"big": 2, "small": 1}


# ------------------------------------------------------------------ error feedback
@pytest.mark.parametrize("encoding", [Encoding(4, topk=0.1), Encoding(1, topk=0.1), Encoding(1, block=64),
                                      Encoding(2, step=2.0), Encoding(2, rank=2)],
                         ids=["topk-4", "topk-1", "block-1", "zero-level-2", "low-rank-2"])
def test_error_feedback_delivers_the_sum_of_a_fixed_update(encoding):
    """200 sends of the same update: with error feedback what arrived sums to what was sent; without, most is lost."""
    rng = np.random.default_rng(0)
    shape = (20, 50) if encoding.rank else (1000,)  # low rank: a matrix its factors fit (2 * 70 <= 1000 / 8)
    reference = {"w": rng.standard_normal(shape).astype(np.float32)}
    update = (rng.standard_normal(shape) * 0.01).astype(np.float32)
    target = {"w": reference["w"] + update}
    total = 200 * update.astype(np.float64)
    for feedback in (True, False):
        residual: dict | None = {} if feedback else None
        arrived = np.zeros(shape, np.float64)
        for _ in range(200):
            record, rebuilt, new = encode_state(target, reference, encoding, residual)
            arrived += decode_state(record, reference)["w"] - reference["w"]
            residual = new if feedback else None
        relative = np.linalg.norm(arrived - total) / np.linalg.norm(total)
        assert relative < 0.1 if feedback else relative > 0.3, (feedback, relative)


# ------------------------------------------------------------------ refusals
@pytest.mark.parametrize("sent, configured", [
    (Encoding(4), Encoding(4, topk=0.1)),
    (Encoding(4, topk=0.1), Encoding(4)),
    (Encoding(4, topk=0.1), Encoding(2, topk=0.1)),
    (Encoding(1, block=64), Encoding(1)),
    (Encoding(1), Encoding(1, block=64)),
    (Encoding(4, entropy="zstd"), Encoding(4)),
    (Encoding(8, budget_bits=8), Encoding(4, budget_bits=2)),
    (Encoding(4, step=1.0), Encoding(4)),
    (Encoding(4), Encoding(4, step=1.0)),
    (Encoding(2, step=1.0, entropy="zstd"), Encoding(4, step=1.0, entropy="zstd")),
    (Encoding(2, rank=4), Encoding(2)),
    (Encoding(2), Encoding(2, rank=4)),
    (Encoding(2, rank=4), Encoding(2, rank=2)),
])
def test_a_reply_in_another_encoding_is_refused(sent, configured):
    target, reference = _pair(4096, 3, scale=0.0)
    target["w"][::50] += 1.0  # compressible, so zstd's format is the one sent
    target, reference = {"w": target["w"].reshape(64, 64)}, {"w": reference["w"].reshape(64, 64)}  # a matrix rank 4 fits
    record, _, _ = encode_state(target, reference, sent)
    check_encoding(record, reference, sent, "up_bits")
    with pytest.raises(CodecError, match=f"{record['w'].dtype}|budget"):
        check_encoding(record, reference, configured, "up_bits")


def test_the_server_refuses_a_reply_without_the_configured_levers_and_keeps_its_state(tmp_path):
    cfg = compose_config([*COMMON, f"output_dir={tmp_path}", "codec=max"])
    strategy = build_strategy(cfg, load_workload(cfg, 4))
    nodes = [FIRST_NODE_ID + i for i in range(4)]
    strategy.client_of = {node: i for i, node in enumerate(nodes)}
    push(strategy.configure_train(1, nodes))
    before = strategy.codec.state_dict()
    sparse = Encoding(4, topk=0.5, entropy="zstd").levers()  # max's width and zstd, top-k instead of its grid and factors
    strategy.aggregate_train(1, [codec_reply(strategy, nodes[0], strategy.global_state, levers=sparse)])
    assert [r.node_id for r in strategy.rejections] == [nodes[0]]
    assert "encodes" in strategy.rejections[0].reason and "k4" in strategy.rejections[0].reason
    assert strategy.codec.state_dict() == before


# ------------------------------------------------------------------ runs
def _run(*overrides: str, grid=None):
    cfg = compose_config([*COMMON, f"output_dir={tempfile.mkdtemp()}", *overrides])
    return run_in_process(cfg) if grid is None else run_in_process(cfg, **grid)


def test_codec_max_learns_at_a_small_share_of_the_bytes_and_ledger_bytes_equal_the_serialised_bytes():
    from fedlayer.client.app import make_client_app
    from fedlayer.server.loop import FederatedRun

    cfg = compose_config([*COMMON, "codec=max", f"output_dir={tempfile.mkdtemp()}"])
    grid = WireCount(make_client_app(cfg), 4, node_config=lambda p: {"partition-id": p, "num-partitions": 4, "host": "in-process"})
    summary = FederatedRun(cfg).run(grid)
    assert (summary["bytes_down"], summary["bytes_up"]) == (grid.down, grid.up)
    assert summary["rejected_replies"] == 0
    # rank-16 factors of fc1 (256 x 512 on digits), the rest at 4 bits on the zero-level grid + zstd: 3.1%;
    # 2 bits + zstd without the factors (codec=max before them): 4.0%
    assert summary["traffic_ratio_vs_fedavg"] < 0.035
    assert summary["final_accuracy"] > 0.25  # digits, 3 rounds of 5 steps: chance is 0.1
    assert 0 < summary["codec_seconds_per_round"] and 0 < summary["codec_seconds_share"] < 1


def test_shared_downloads_send_the_same_bytes_and_train_the_same_model():
    one, alone = _run("codec=b4", "codec.shared_downlink=true")
    each, apart = _run("codec=b4")
    assert states_equal(one.strategy.global_state, each.strategy.global_state)
    assert (alone["bytes_up"], alone["bytes_down"]) == (apart["bytes_up"], apart["bytes_down"])
    lines = one.rundir.read_metrics()
    assert lines[0]["codec"]["shared_downloads"] == 3  # round 1: four clients hold the initial model, one encoding


# ------------------------------------------------------------------ exact resume with codec=max, every method
RESUME_CASES = {
    "fedavg": (["strategy=fedavg"], 2),
    "fedlama": (["strategy=fedlama", "strategy.phi=2", "strategy.min_round_to_adjust=0"], 3),
    "fedlp": (["strategy=fedlp", "strategy.scheme=heterogeneous"], 2),
    "laq": (["strategy=laq", "federation.fraction_train=1.0"], 2),
    "pfedla": (["strategy=pfedla"], 2),
    "fll": (["strategy=fll", "strategy.rounds_per_stage=1"], 2),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_codec_max_resumes_exactly(tmp_path, case):
    strategy_overrides, crash_after = RESUME_CASES[case]
    common = [*_common([*strategy_overrides, "codec=max"]), f"output_dir={tmp_path}", f"client_state_dir={tmp_path / 'state-straight'}"]
    run_in_process(compose_config([*common, "run_name=straight"]))
    crashed = [*common[:-1], f"client_state_dir={tmp_path / 'state-crashed'}", "run_name=crashed"]
    with pytest.raises(SimulatedCrash):
        run_in_process(compose_config(crashed), crash_at=(crash_after + 1, 1))
    run_in_process(resolve_resume(compose_config([f"resume={tmp_path / 'crashed'}"])), first_node_id=FIRST_NODE_ID + 1000)
    assert_same_run(tmp_path / "straight", tmp_path / "crashed")


# ------------------------------------------------------------------ configuration
def test_codec_presets_compose_and_codec_keys_still_override():
    for preset, bits in (("b8", 8), ("b4", 4), ("b2", 2), ("b1", 1), ("b32", 32)):
        cfg = compose_config([f"codec={preset}"])
        assert (cfg.codec.up_bits, cfg.codec.down_bits) == (bits, bits)
    best = compose_config(["codec=max", "codec.step=1.5", "codec.up_bits=2"])
    assert (best.codec.step, best.codec.up_bits, best.codec.down_bits, best.codec.rank) == (1.5, 2, 4, 16)
    assert best.codec.entropy == "zstd"
    assert compose_config(["codec.up_bits=4"]).codec.down_bits == 32  # the plain overrides of the suites and tests
    for overrides in (["codec=max"], ["codec.up_bits=2", "codec.block=64"]):  # clients build the same tree without Hydra
        assert dict(load_config(overrides).codec) == dict(compose_config(overrides).codec)


@pytest.mark.parametrize("override, field", [
    ("codec.topk=0", "codec.topk"), ("codec.entropy=lz4", "codec.entropy"), ("codec.block=-1", "codec.block"),
    ("codec.budget_bits=0.5", "codec.budget_bits"), ("codec.shared_downlink=maybe", "codec.shared_downlink"),
    ("codec.step=0", "codec.step"), ("codec.rank=-1", "codec.rank"), ("codec.rank=65", "codec.rank"),
])
def test_a_bad_lever_fails_at_start_naming_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        compose_config([override])
    assert err.value.field == field


@pytest.mark.parametrize("other", ["codec.topk=0.1", "codec.down_topk=0.5", "codec.budget_bits=2"])
def test_the_zero_level_grid_refuses_levers_that_use_the_laq_grid_naming_the_field(other):
    with pytest.raises(ConfigError) as err:
        compose_config(["codec=b4", "codec.step=1.0", other])
    assert err.value.field == "codec.step"


@pytest.mark.parametrize("other", ["codec.topk=0.1", "codec.budget_bits=2"])
def test_low_rank_refuses_top_k_and_budgets_naming_the_field(other):
    with pytest.raises(ConfigError) as err:
        compose_config(["codec=b2", "codec.rank=4", other])  # (codec=max has a step too, which is named first)
    assert err.value.field == "codec.rank"


def test_levers_refuse_16_bits_naming_the_field():
    with pytest.raises(ConfigError) as err:
        compose_config(["codec=max", "codec.down_bits=16"])
    assert err.value.field == "codec.down_bits"
    with pytest.raises(ConfigError, match="unknown option 'zz'"):
        compose_config(["codec=zz"])
