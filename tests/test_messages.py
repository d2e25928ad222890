"""Typed messages (``fedlayer.wire.messages``) and server state declared once (``fedlayer.methods.server_state``).

Both halves of a method use one dataclass per direction: what the server
encodes is what the client decodes, a bad entry is refused naming its key,
and a strategy's checkpointed state round-trips through JSON from its
dataclass alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from benchmarks.faults import make_reply
from fedlayer.errors import ParameterError
from fedlayer.layers import select, torch_state_to_numpy
from fedlayer.methods.fedlp import FedLPOptions, FedLPReport
from fedlayer.methods.fll import FLLOptions, FLLStrategy, stage_config_of
from fedlayer.methods.laq import LAQConfig, LAQOptions, LAQStrategy, LAQUpdate, update_records
from fedlayer.methods.server_state import attr, load_state, save_state
from fedlayer.models import build_model
from fedlayer.wire.messages import MessageError, decode, encode, encode_metrics, wire
from fedlayer.wire.records import CONFIG, PAYLOAD, RoundConfig


@dataclass(frozen=True)
class Sample:
    count: int = wire("sample-count")
    rate: float = wire("sample-rate")
    names: list[str] = wire("sample-names")
    flag: bool | None = wire("sample-flag", None)


def test_a_message_round_trips_and_an_absent_optional_adds_no_key():
    message = Sample(count=3, rate=0.5, names=["a", "b"])
    entries = encode(message)
    assert entries == {"sample-count": 3, "sample-rate": 0.5, "sample-names": ["a", "b"]}
    assert decode(Sample, ConfigRecord(entries)) == message
    assert decode(Sample, {**entries, "sample-flag": True, "other": 1}).flag is True


@pytest.mark.parametrize(
    ("entries", "key"),
    [
        ({"sample-rate": 0.5, "sample-names": ["a"]}, "sample-count"),  # missing
        ({"sample-count": 1.0, "sample-rate": 0.5, "sample-names": ["a"]}, "sample-count"),  # a float in a config
        ({"sample-count": True, "sample-rate": 0.5, "sample-names": ["a"]}, "sample-count"),  # a bool is no int
        ({"sample-count": 1, "sample-rate": "x", "sample-names": ["a"]}, "sample-rate"),
        ({"sample-count": 1, "sample-rate": 0.5, "sample-names": "a"}, "sample-names"),
        ({"sample-count": 1, "sample-rate": 0.5, "sample-names": [1]}, "sample-names"),
        ({"sample-count": 1, "sample-rate": 0.5, "sample-names": ["a"], "sample-flag": 1}, "sample-flag"),
    ],
)
def test_a_missing_or_mistyped_entry_is_refused_naming_its_key(entries, key):
    with pytest.raises(MessageError, match=key):
        decode(Sample, entries)


def test_metrics_travel_as_floats_and_an_integral_float_decodes_as_an_int():
    report = FedLPReport(train_flops=10.0, train_flops_full=20.0, depth_level=2)
    entries = encode_metrics(report)
    assert all(type(v) is float for v in entries.values())
    assert decode(FedLPReport, MetricRecord(entries), metrics=True) == report
    with pytest.raises(MessageError, match="depth-level"):
        decode(FedLPReport, {"depth-level": 1.5}, metrics=True)
    with pytest.raises(MessageError, match="train-flops"):
        decode(FedLPReport, {"train-flops": float("nan")}, metrics=True)  # the receiver's check


def _fll(**kwargs) -> FLLStrategy:
    model = build_model("cnn", input_shape=(1, 28, 28), num_classes=10, seed=0)
    strategy = FLLStrategy(torch_state_to_numpy(model.state_dict()), model=model, **kwargs)
    strategy.client_of = {7: 0}
    return strategy


@pytest.mark.parametrize("rule", ["fixed", "plateau"])
def test_the_client_decodes_the_fll_message_the_server_encoded(rule):
    strategy = _fll(stage_rule=rule, stage_steps="equal_flops", p_drop=0)  # an int p_drop travels as it was given
    (message,) = strategy.configure_train(1, [7])
    sent = stage_config_of(message.content)
    assert sent == strategy.stage_config(train=True)
    assert (sent.validation_fraction is not None) == (rule == "plateau") and sent.step_factor is not None
    assert message.content[CONFIG]["fll-p-drop"] == 0 and isinstance(message.content[CONFIG]["fll-p-drop"], int)
    round_config = decode(RoundConfig, message.content[CONFIG])
    assert (round_config.server_round, round_config.method, round_config.keep_model) == (1, "fll", True)
    # evaluate messages carry the stage without the validation settings
    assert stage_config_of(RecordDict({CONFIG: ConfigRecord(strategy.message_config())})) == strategy.stage_config()


def test_a_message_the_client_cannot_decode_raises_before_it_trains():
    strategy = _fll()
    (message,) = strategy.configure_train(1, [7])
    del message.content[CONFIG]["fll-stage-head"]
    with pytest.raises(MessageError, match="fll-stage-head"):
        stage_config_of(message.content)


def test_an_fll_reply_with_a_mistyped_report_is_refused_and_changes_nothing():
    strategy = _fll(stage_rule="plateau")
    (message,) = strategy.configure_train(1, [7])
    state = select(strategy.global_state, strategy.layers, strategy.plans[7].request)
    metrics = {"val-examples": 10.0, "val-accuracy": 0.5, "cuda-peak-memory-bytes": -1.0}
    reply = make_reply(7, state, metrics=metrics, to=strategy)
    before = {k: v.copy() for k, v in strategy.global_state.items()}
    assert strategy.aggregate_train(1, [reply]) is None
    assert "cuda-peak-memory-bytes" in strategy.rejections[0].reason
    assert all(np.array_equal(before[k], strategy.global_state[k]) for k in before)


def test_laq_messages_are_the_same_class_on_both_halves():
    state = {"w": np.zeros((2, 3), np.float32)}
    strategy = LAQStrategy(state, num_clients=2, l2=0)
    strategy.client_of = {5: 0}
    plan = strategy.plan(1, 5)
    assert decode(LAQConfig, plan.config).version == 0 and plan.config["laq-l2"] == 0
    with pytest.raises(MessageError, match="laq-mode"):
        decode(LAQConfig, {**plan.config, "laq-mode": "other"})
    payload = update_records(3, None)[PAYLOAD]
    assert decode(LAQUpdate, payload) == LAQUpdate(3, skip=True, error=0.0)
    with pytest.raises(MessageError, match="laq-base"):
        decode(LAQUpdate, {**payload, "laq-base": 3.0})  # a config value keeps its type


@pytest.mark.parametrize(
    ("options", "name"),
    [
        (lambda: FLLOptions(2, 1, 2, "linear", "fixed", True, 1.0, "supervised", 0.5, "fixed", 2, 0.0, 100, 0.1), "p_drop"),
        (lambda: FLLOptions(2, 1, 2, "linear", "fixed", 1, 0.0, "supervised", 0.5, "fixed", 2, 0.0, 100, 0.1), "checkpoint_activations"),
        (lambda: LAQOptions("gradient", 9, 10, 0.8, 100, 0.02, 0.01, 0), "bits"),
        (lambda: LAQOptions("gradient", 4, 10, 0.8, 100, 0.0, 0.01, 0), "alpha"),
        (lambda: FedLPOptions("mixed", 0.5, False, "unit", "keepers"), "scheme"),
        (lambda: FedLPOptions("heterogeneous", 0.5, False, "tensor", "keepers"), "draw"),
    ],
)
def test_checked_options_name_the_argument(options, name):
    with pytest.raises(ParameterError) as raised:
        options()
    assert raised.value.name == name


# ------------------------------------------------------------------ server state
class Counter:
    """Something with its own state_dict, restored in place."""

    def __init__(self) -> None:
        self.count = 0

    def state_dict(self) -> dict[str, int]:
        return {"count": self.count}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.count = int(state["count"])


class Holder:
    def __init__(self) -> None:
        self.delivered: dict[int, set[str]] = {}
        self.heads: dict[str, np.ndarray] = {}
        self.best: float | None = None
        self.rng = np.random.default_rng(0)
        self.inner = type("Inner", (), {})()
        self.inner.counter = Counter()
        self.seen: list[int] = []
        self.extra: list[int] = [5]


@dataclass
class Group:
    seen: list[int]


@dataclass
class HolderState:
    delivered: dict[int, set[str]]
    heads: dict[str, np.ndarray]
    best: float | None
    rng: np.random.Generator
    counter: Counter = attr("inner.counter")
    group: Group
    extra: list[int] = field(default_factory=list)


def test_state_round_trips_through_json_and_a_snapshot_is_a_copy():
    holder = Holder()
    holder.delivered = {3: {"b", "a"}}
    holder.heads = {"w": np.arange(3.0)}
    holder.best = 0.5
    holder.inner.counter.count = 4
    holder.seen = [1, 2]
    holder.rng.random()
    saved = save_state(holder, HolderState)
    assert saved["delivered"] == {"3": ["a", "b"]} and saved["group"] == {"seen": [1, 2]}
    expected = holder.rng.random()
    holder.heads["w"][0] = 99.0  # the snapshot holds its own arrays
    holder.delivered[3].add("c")
    plain = json.loads(json.dumps({**saved, "heads": {}}))
    restored = Holder()
    load_state(restored, HolderState, {**plain, "heads": saved["heads"]})
    assert restored.delivered == {3: {"a", "b"}} and restored.best == 0.5 and restored.seen == [1, 2]
    assert restored.heads["w"][0] == 0.0 and restored.inner.counter.count == 4
    assert restored.rng.random() == expected  # the generator resumed where it was saved
    assert restored.extra == [5]


def test_a_missing_state_key_takes_its_default_or_is_an_error():
    saved = save_state(Holder(), HolderState)
    del saved["extra"]
    holder = Holder()
    load_state(holder, HolderState, saved)
    assert holder.extra == []  # absent from the saved state (an older checkpoint): the default
    del saved["best"]
    with pytest.raises(KeyError, match="best"):
        load_state(Holder(), HolderState, saved)
