"""The codec stage: layers as b-bit differences from a shared reference, both directions, every method."""

from __future__ import annotations

import tempfile

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from fedlayer.codec.client import RESIDUAL
from fedlayer.wire.tensors import RESIDUAL_CLIP, CodecError, check_encoding, decode_state, encode_state
from fedlayer.config import compose_config
from fedlayer.errors import ConfigError
from fedlayer.layers import states_equal, to_arrayrecord
from fedlayer.server.builder import build_strategy
from fedlayer.traffic.size import measure_message
from fedlayer.workload import load_workload
from tests.inprocess import InProcessGrid, run_in_process

COMMON = ["dataset=digits", "model=cnn", "federation.num_clients=4", "federation.rounds=3",
          "train.local_steps=5", "evaluation.max_examples=300"]


def _run(*overrides: str, **grid_options):
    cfg = compose_config([*COMMON, f"output_dir={tempfile.mkdtemp()}", *overrides])
    return run_in_process(cfg, **grid_options)


@pytest.mark.parametrize("bits", [2, 1])
def test_error_feedback_delivers_the_sum_of_a_fixed_update(bits):
    """200 uploads of the same update against a fixed reference: what arrived sums to what was sent.

    With error feedback the gap is the last residual, bounded; without it the
    quantiser's bias adds up round after round.
    """
    rng = np.random.default_rng(0)
    reference = {"w": rng.standard_normal(1000).astype(np.float32)}
    update = {"w": (rng.standard_normal(1000) * 0.01).astype(np.float32)}
    target = {"w": reference["w"] + update["w"]}
    for feedback in (True, False):
        residual: dict = {} if feedback else None
        arrived = np.zeros(1000, np.float64)
        for _ in range(200):
            record, rebuilt, new = encode_state(target, reference, bits, residual)
            decoded = decode_state(record, reference)
            assert np.array_equal(decoded["w"], rebuilt["w"])  # the receiver rebuilds exactly what the sender expects
            arrived += decoded["w"] - reference["w"]
            if feedback:
                residual = new
        total = 200 * update["w"].astype(np.float64)
        relative = np.linalg.norm(arrived - total) / np.linalg.norm(total)
        if bits == 1:  # signs need a residual of several updates to reach the large coordinates; it is clipped
            assert relative < 0.1 if feedback else relative > 0.5
            continue
        # 2 bits: the gap is the last residual, what the grid (its radius capped at 2 RMS) still owes the
        # outliers it clipped: about one update's norm, so 200 sends arrive within 1%; without, 39% is lost
        assert relative < 0.01 if feedback else relative > 0.3
        if feedback:
            assert np.linalg.norm(residual["w"]) < 2 * np.linalg.norm(update["w"])


def test_a_4_bit_layer_costs_an_eighth_of_float32_plus_a_header():
    rng = np.random.default_rng(1)
    state = {"conv.weight": rng.standard_normal((64, 32, 3, 3)).astype(np.float32)}
    reference = {"conv.weight": state["conv.weight"] + rng.standard_normal((64, 32, 3, 3)).astype(np.float32) * 0.1}

    def key_bytes(record: ArrayRecord) -> int:
        message = Message(RecordDict({"arrays": record, "config": ConfigRecord({"x": 1})}), dst_node_id=1, message_type=MessageType.TRAIN)
        return measure_message(message).by_key["conv.weight"]

    raw = state["conv.weight"].nbytes
    assert raw < key_bytes(to_arrayrecord(state)) < raw + 400
    for bits in (8, 4, 2, 1):
        encoded = key_bytes(encode_state(state, reference, bits)[0])
        assert 0 < encoded - raw * bits / 32 < 256, bits  # a fixed header: dtype, stype, shape, radius, object ids


@pytest.mark.parametrize("bits", [8, 4, 2, 1])
@pytest.mark.parametrize("count", [1, 7, 1001])
def test_round_trip_to_the_exact_byte_count(bits, count):
    rng = np.random.default_rng(count)
    reference = {"w": rng.standard_normal(count).astype(np.float32)}
    target = {"w": reference["w"] + rng.standard_normal(count).astype(np.float32)}
    record, rebuilt, _ = encode_state(target, reference, bits)
    assert len(record["w"].data) == 4 + -(-count * bits // 8)  # the float32 radius or scale, then the packed codes
    assert np.array_equal(decode_state(record, reference)["w"], rebuilt["w"])
    error = np.abs(rebuilt["w"] - target["w"]).max()
    assert error <= (np.abs(target["w"] - reference["w"]).max() * (1 if bits == 1 else 2 / (2**bits - 1))) + 1e-6


@pytest.mark.parametrize("sent, configured", [(1, 4), (4, 1), (2, 1)])
def test_a_reply_in_another_width_is_refused(sent, configured):
    rng = np.random.default_rng(3)
    reference = {"w": rng.standard_normal(50).astype(np.float32)}
    record, _, _ = encode_state({"w": reference["w"] + 1}, reference, sent)
    check_encoding(record, reference, sent, "up_bits")
    with pytest.raises(CodecError, match=f"reply encoded at {sent} bits \\(w\\), configured up_bits={configured}"):
        check_encoding(record, reference, configured, "up_bits")


def test_a_residual_is_clipped_to_a_multiple_of_the_update():
    """A residual far above the current difference (a layer that rarely travels) is sent only up to the bound."""
    rng = np.random.default_rng(4)
    reference = {"w": rng.standard_normal(500).astype(np.float32)}
    update = (rng.standard_normal(500) * 0.01).astype(np.float32)
    residual = {"w": (rng.standard_normal(500) * 1e20).astype(np.float32)}
    for bits in (2, 1):
        _, rebuilt, new = encode_state({"w": reference["w"] + update}, reference, bits, residual)
        sent = np.linalg.norm(rebuilt["w"] - reference["w"])
        assert sent <= 20 * np.linalg.norm(update)  # 1 + RESIDUAL_CLIP (8) times the update, twice over for the grid
        assert np.linalg.norm(new["w"]) <= 2 * (1 + RESIDUAL_CLIP) * np.linalg.norm(update)


def test_malformed_encodings_are_refused():
    rng = np.random.default_rng(2)
    reference = {"w": rng.standard_normal(50).astype(np.float32)}
    record, _, _ = encode_state({"w": reference["w"] + 1}, reference, 4)
    array = record["w"]
    from flwr.app import Array

    for bad in (
        Array(dtype=array.dtype, shape=array.shape, stype=array.stype, data=array.data[:-1]),
        Array(dtype="q3", shape=array.shape, stype=array.stype, data=array.data),
        Array(dtype=array.dtype, shape=(49,), stype=array.stype, data=array.data),
        Array(dtype=array.dtype, shape=array.shape, stype=array.stype, data=b"\x00\x00\xc0\x7f" + array.data[4:]),  # NaN radius
    ):
        with pytest.raises(CodecError):
            decode_state(ArrayRecord({"w": bad}), reference)
    with pytest.raises(CodecError, match="no reference"):
        decode_state(record, {})


@pytest.mark.parametrize("strategy", ["fedavg", "fedlama", "fedlp", "fll", "pfedla", "laq"])
def test_every_method_with_16_bits_both_ways_matches_dense_to_float16_precision(strategy):
    """One round: the model differs from the dense run's by float16 rounding of the update.

    (Over more rounds the clients train from slightly different models and
    the gap grows as training amplifies it; 3 rounds of FedAvg: about 1e-4.)
    """
    extra = {"fedlama": ["strategy.phi=2", "strategy.min_round_to_adjust=0"]}.get(strategy, [])
    dense_run, dense = _run(f"strategy={strategy}", *extra, "federation.rounds=1")
    coded_run, coded = _run(f"strategy={strategy}", *extra, "federation.rounds=1", "codec.up_bits=16", "codec.down_bits=16")
    assert coded["rejected_replies"] == 0 and coded["codec_resyncs"] == 0
    initial = build_strategy(dense_run.cfg, load_workload(dense_run.cfg, 4)).global_state
    for key, value in dense_run.strategy.global_state.items():
        if value.dtype != np.float32:
            continue
        gap = np.abs(value - coded_run.strategy.global_state[key]).max()
        update = np.abs(value - initial[key]).max()
        assert gap <= 2**-10 * update + 1e-7, (key, gap, update)
    # FLL's stage heads are not in the model both ends start from: their first trip is dense
    share = 0.9 if strategy == "fll" else 0.55
    assert coded["bytes_down"] < share * dense["bytes_down"]
    if strategy != "laq":  # LAQ's uplink is its own quantised innovation
        assert coded["bytes_up"] < share * dense["bytes_up"]


@pytest.mark.parametrize("strategy", ["fedavg", "fedlama", "fll"])
def test_4_bits_both_ways_cost_an_eighth_and_learn(strategy):
    extra = ["strategy.phi=2", "strategy.min_round_to_adjust=0"] if strategy == "fedlama" else []
    _, dense = _run(f"strategy={strategy}", *extra)
    _, coded = _run(f"strategy={strategy}", *extra, "codec.up_bits=4", "codec.down_bits=4")
    assert coded["rejected_replies"] == 0
    total, dense_total = coded["bytes_up"] + coded["bytes_down"], dense["bytes_up"] + dense["bytes_down"]
    assert total < 0.15 * dense_total
    # the FedAvg equivalent stays the dense model (the codec's few config bytes aside)
    assert coded["fedavg_bytes_total"] == pytest.approx(dense["fedavg_bytes_total"], rel=1e-4)
    assert coded["final_accuracy"] > dense["final_accuracy"] - 0.05


class ForgetfulGrid(InProcessGrid):
    """A node loses its whole state (a restart without its state folder) before round ``forget_at``."""

    forget: tuple[int, int] = (0, 0)

    def push_messages(self, messages):
        messages = list(messages)
        server_round, node = self.forget
        if any(m.metadata.message_type == "train" and int(m.content["config"]["server-round"]) == server_round for m in messages):
            self.contexts[node].state = RecordDict()
            self.forget = (0, 0)
        return super().push_messages(messages)


def test_a_client_that_lost_its_reference_gets_a_dense_resync_then_continues_compressed(tmp_path):
    cfg = compose_config([*COMMON, f"output_dir={tmp_path}", "run_name=run", "federation.rounds=5",
                          "train.local_steps=10", "codec.up_bits=4", "codec.down_bits=4"])
    from fedlayer.client.app import make_client_app
    from fedlayer.server.loop import FederatedRun
    from fedlayer.server.rundir import RunDirectory
    from tests.inprocess import FIRST_NODE_ID

    grid = ForgetfulGrid(make_client_app(cfg), 4, node_config=lambda p: {"partition-id": p, "num-partitions": 4})
    grid.forget = (3, FIRST_NODE_ID + 1)
    summary = FederatedRun(cfg).run(grid)
    records = RunDirectory(tmp_path / "run").read_metrics()
    # round 3: it refuses the download encoded against a reference it no longer holds
    assert [r["rejected"] for r in records] == [0, 0, 1, 0, 0]
    # round 4: a dense resync (the whole reference), counted; round 5: compressed again
    assert [r["codec_resyncs"] for r in records] == [0, 0, 0, 1, 0] and summary["codec_resyncs"] == 1
    assert records[3]["bytes_down"] > 2 * records[4]["bytes_down"]
    assert records[4]["rejected"] == 0 and records[4]["replies"] == 4
    assert summary["final_accuracy"] > 0.5


def test_codec_bits_are_checked_and_name_the_field():
    for field in ("up_bits", "down_bits"):
        cfg = compose_config(["dataset=digits", "model=cnn", f"codec.{field}=3"])
        with pytest.raises(ConfigError) as err:
            build_strategy(cfg, load_workload(cfg, 2))
        assert err.value.field == f"codec.{field}"


def test_32_bits_is_todays_wire():
    """The default sends no codec keys at all (the fingerprints test checks the results bitwise)."""
    cfg = compose_config(["dataset=digits", "model=cnn"])
    strategy = build_strategy(cfg, load_workload(cfg, 2))
    assert strategy.codec is None
    strategy.client_of = {1: 0}
    (message,) = strategy.configure_train(1, [1])
    assert not any(key.startswith("codec") for key in message.content["config"]) and list(message.content) == ["config", "arrays"]
    assert states_equal({k: v.numpy() for k, v in message.content["arrays"].items()}, strategy.global_state)


def test_a_round_below_min_replies_still_settles_the_codec_versions(tmp_path):
    """Two of three clients fail in round 2 (min_replies=2): no aggregation, but the one
    that replied committed its new reference, and the server knows it (no resync later)."""
    from fedlayer.client.app import make_client_app
    from fedlayer.server.loop import FederatedRun

    cfg = compose_config([*COMMON, f"output_dir={tmp_path}", "run_name=run", "federation.num_clients=3",
                          "federation.min_replies=2", "codec.up_bits=8", "codec.down_bits=8"])

    class FailingGrid(InProcessGrid):
        def push_messages(self, messages):
            messages = list(messages)
            failing = any(m.metadata.message_type == "train" and int(m.content["config"]["server-round"]) == 2 for m in messages)
            for p in (1, 2):  # a bad device in round 2 only
                self.contexts[self.first_node_id + p].node_config["device"] = "tpu" if failing else "cpu"
            return super().push_messages(messages)

    summary = FederatedRun(cfg).run(FailingGrid(make_client_app(cfg), 3, node_config=lambda p: {"partition-id": p, "num-partitions": 3}))
    assert summary["codec_resyncs"] == 0 and summary["rejected_replies"] == 2


class ResidualWatch(InProcessGrid):
    """Records, after every exchange, the largest error-feedback residual (L2, per tensor) any node holds."""

    peaks: list[float]

    def pull_messages(self, message_ids):
        replies = super().pull_messages(message_ids)
        from fedlayer.layers import from_arrayrecord

        norms = [float(np.linalg.norm(v)) for c in self.contexts.values() if RESIDUAL in c.state.array_records
                 for v in from_arrayrecord(c.state[RESIDUAL]).values()]
        self.peaks = [*getattr(self, "peaks", []), max(norms, default=0.0)]
        return replies


@pytest.mark.parametrize("bits, levers", [(2, []), (1, []), (2, ["codec.rank=1"])], ids=["2-bit", "1-bit", "rank-1"])
def test_fedlama_phi_4_at_low_bits_stays_finite_and_learns_over_200_rounds(bits, levers):
    """The combination that diverged (2 bits, phi=4), 1 bit, and rank-1 factors of the weight (10 x 64, the
    bias at 2 bits): residuals stay bounded, the model learns."""
    from fedlayer.client.app import make_client_app
    from fedlayer.server.loop import FederatedRun

    cfg = compose_config(["dataset=digits", "model=linear", "federation.num_clients=3", "federation.rounds=200",
                          "train.local_steps=1", "evaluation.max_examples=300", "evaluation.every=100",
                          "strategy=fedlama", "strategy.phi=4", "strategy.min_round_to_adjust=0",
                          f"codec.up_bits={bits}", f"codec.down_bits={bits}", *levers, f"output_dir={tempfile.mkdtemp()}"])
    grid = ResidualWatch(make_client_app(cfg), 3, node_config=lambda p: {"partition-id": p, "num-partitions": 3, "host": "in-process"})
    run = FederatedRun(cfg)
    summary = run.run(grid)
    assert summary["rejected_replies"] == 0 and summary["final_accuracy"] > 0.8
    model_norm = max(float(np.linalg.norm(v)) for v in run.strategy.global_state.values())
    assert np.isfinite(model_norm) and len(grid.peaks) >= 200
    # a residual stays a fraction of the model, and does not creep up over the run
    assert max(grid.peaks) < 0.25 * model_norm
    assert max(grid.peaks[100:]) < 1.5 * max(grid.peaks[:100])


def test_a_non_finite_global_model_stops_the_run_with_one_line(tmp_path):
    from fedlayer.server.loop import RunStopped

    # one step at lr 1e36: finite weights (the replies pass validation) whose logits overflow float32
    cfg = compose_config([*COMMON, f"output_dir={tmp_path}", "run_name=run", "model=linear", "train.local_steps=1", "train.lr=1e36", "aggregation.norm_guard=false"])
    with pytest.raises(RunStopped, match=r"round 1: the global model.s central loss is (nan|inf)"):
        run_in_process(cfg)
    error = (tmp_path / "run" / "error.txt").read_text().strip()
    assert "\n" not in error and "no longer usable" in error


class WireCount(InProcessGrid):
    """Counts the serialised bytes of every message that crosses: each distinct Flower object, deflated."""

    down: int = 0
    up: int = 0

    @staticmethod
    def _bytes(message: Message) -> int:
        seen: dict[str, int] = {}

        def walk(obj, object_id):
            for child_id, child in (obj.children or {}).items():
                walk(child, child_id)
            seen[object_id] = len(obj.deflate())

        walk(message, message.object_id)
        return sum(seen.values())

    def push_messages(self, messages):
        messages = list(messages)
        self.down += sum(self._bytes(m) for m in messages)
        return super().push_messages(messages)

    def pull_messages(self, message_ids):
        replies = list(super().pull_messages(message_ids))
        self.up += sum(self._bytes(m) for m in replies)
        return replies


@pytest.mark.parametrize("bits", [1, 2])
def test_ledger_bytes_equal_the_serialised_bytes(bits):
    from fedlayer.client.app import make_client_app
    from fedlayer.server.loop import FederatedRun

    cfg = compose_config([*COMMON, "federation.rounds=2", "strategy=fedlama", "strategy.phi=2", "strategy.min_round_to_adjust=0",
                          f"codec.up_bits={bits}", f"codec.down_bits={bits}", f"output_dir={tempfile.mkdtemp()}"])
    grid = WireCount(make_client_app(cfg), 4, node_config=lambda p: {"partition-id": p, "num-partitions": 4, "host": "in-process"})
    summary = FederatedRun(cfg).run(grid)
    assert (summary["bytes_down"], summary["bytes_up"]) == (grid.down, grid.up)


@pytest.mark.parametrize("up_bits", [32, 2])
def test_a_downloads_quantisation_error_does_not_enter_the_global_model(up_bits):
    """Clients that return exactly the model they rebuilt (no training) leave the global model where it was.

    Each client trains from ``r + Q(x - r)``; the methods average the models
    clients return, so without the correction each round's download error
    (at 2 bits on the LAQ grid, a third of the tensor's largest difference on
    every value) entered the global model, where no later download corrects it.
    """
    from benchmarks.faults import codec_reply, push, sent_message
    from fedlayer.codec.client import open_download
    from flwr.app import Context
    from fedlayer.layers import copy_state, from_arrayrecord
    from fedlayer.wire.records import ARRAYS
    from tests.inprocess import FIRST_NODE_ID

    cfg = compose_config(["dataset=digits", "model=cnn", "federation.num_clients=4", "federation.fraction_train=1.0",
                          f"output_dir={tempfile.mkdtemp()}", "codec.down_bits=2", f"codec.up_bits={up_bits}"])
    strategy = build_strategy(cfg, load_workload(cfg, 4))
    nodes = [FIRST_NODE_ID + i for i in range(4)]
    strategy.client_of = {node: i for i, node in enumerate(nodes)}
    # the download of round 1 is the difference from the initial model: make it one a 2-bit grid cannot carry exactly
    rng = np.random.default_rng(0)
    strategy.global_state = {k: (v + rng.standard_normal(v.shape).astype(np.float32) * 0.1).astype(v.dtype)
                             for k, v in strategy.global_state.items()}
    before = copy_state(strategy.global_state)
    push(strategy.configure_train(1, nodes))
    replies, errors = [], []
    for node in nodes:
        context = Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})
        dense, _ = open_download(sent_message(strategy, node).content, context, lambda: copy_state(strategy.codec.initial), True)
        held = from_arrayrecord(dense[ARRAYS])
        errors.append(max(float(np.abs(held[k] - before[k]).max()) for k in before))
        replies.append(codec_reply(strategy, node, held))
    assert min(errors) > 1e-3  # what each client holds is off by the download's error...
    strategy.aggregate_train(1, replies)
    assert not strategy.rejections
    moved = max(float(np.abs(strategy.global_state[k] - before[k]).max()) for k in before)
    assert moved < 1e-5, moved  # ...and none of it reaches the global model


def test_a_layer_back_rounds_after_its_download_carries_no_download_error_and_the_checkpoint_keeps_what_was_meant():
    """FedLAMA's long-interval layers go down in one round and come back in a later one."""
    from benchmarks.faults import push
    from flwr.app import MetricRecord
    from fedlayer.codec.server import ServerCodec
    from fedlayer.wire.records import ARRAYS, CODEC_VERSION, METRICS

    def reply(version: int, state: dict) -> Message:
        sent = push([Message(content=RecordDict(), message_type=MessageType.TRAIN, dst_node_id=7)])[0]
        content = RecordDict({METRICS: MetricRecord({CODEC_VERSION: version})})
        if state:
            content[ARRAYS] = to_arrayrecord(state)
        return Message(content, reply_to=sent)

    rng = np.random.default_rng(1)
    initial = {"w": rng.standard_normal(500).astype(np.float32)}
    meant = {"w": initial["w"] + (rng.standard_normal(500) * 0.1).astype(np.float32)}
    codec = ServerCodec(initial, 32, 2)
    codec.start_round()
    config, records, _ = codec.download(0, meant, train=True)  # round 1: the layer goes down at 2 bits
    held = decode_state(records["arrays"], initial)
    assert np.abs(held["w"] - meant["w"]).max() > 1e-2  # the client holds it with the download's error
    codec.receive(0, reply(config[CODEC_VERSION] + 1, {}), 1)  # it keeps training the layer, sends nothing yet
    codec.commit([0], 1)
    resumed = ServerCodec(initial, 32, 2)  # a resumed server knows what was meant
    resumed.load_state_dict(codec.state_dict())
    update = (rng.standard_normal(500) * 0.01).astype(np.float32)
    for server in (codec, resumed):
        server.start_round()
        config, _, _ = server.download(0, {}, train=True)  # round 2: the layer does not go down; it comes back
        answer = reply(config[CODEC_VERSION] + 1, {"w": held["w"] + update})
        server.receive(0, answer, 2)
        assert np.allclose(answer.content[ARRAYS]["w"].numpy(), meant["w"] + update, atol=1e-6)


@pytest.mark.parametrize("bits, cap", [(2, 2.0), (4, 4.0)])
def test_the_codec_grid_takes_its_step_from_the_rms_not_from_one_outlier(bits, cap):
    """One large value (a stale client's, a long-interval layer's) no longer coarsens a whole 2- or 4-bit tensor."""
    rng = np.random.default_rng(3)
    reference = {"w": rng.standard_normal(4000).astype(np.float32)}
    diff = (rng.standard_normal(4000) * 0.01).astype(np.float32)
    diff[17] = 5.0  # 500 times the typical difference
    record, rebuilt, _ = encode_state({"w": reference["w"] + diff}, reference, bits)
    radius = float(np.frombuffer(record["w"].data[:4], "<f4")[0])
    rms = float(np.sqrt(np.mean(diff.astype(np.float64) ** 2)))
    assert radius == pytest.approx(cap * rms, rel=1e-6) and radius < 5.0
    assert len(record["w"].data) == 4 + 4000 * bits // 8  # the format is the LAQ grid's, unchanged
    error = rebuilt["w"] - reference["w"] - diff
    assert np.abs(np.delete(error, 17)).max() <= radius / (2**bits - 1) * 1.0001  # one step, of the capped grid
    assert rebuilt["w"][17] - reference["w"][17] == pytest.approx(radius, rel=1e-5)  # the outlier clipped: owed later
    from fedlayer.wire.tensors import encode_grid
    laq, _ = encode_grid(reference["w"] + diff, reference["w"], bits)  # LAQ's own innovations keep its paper's radius
    assert np.frombuffer(laq.data[:4], "<f4")[0] == np.float32(np.abs(diff).max())
