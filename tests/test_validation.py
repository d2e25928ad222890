"""Reply validation: every kind of bad reply is refused with a reason."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Error, Message, RecordDict

from fedlayer.layers import ModelLayers, select
from fedlayer.methods.replies import ReplyRejected, validate_train_reply
from tests.conftest import make_reply, small_state

LAYERS = ModelLayers.from_state(small_state())


def test_valid_partial_reply_is_accepted():
    reply = validate_train_reply(make_reply(7, select(small_state(1), LAYERS, ["head.fc"]), 12), LAYERS, allowed=["head.fc"])
    assert reply.node_id == 7 and reply.num_examples == 12 and reply.layer_names == {"head.fc"}


def _bad(state_change):
    state = small_state(1)
    state_change(state)
    return state


@pytest.mark.parametrize(
    ("state", "reason"),
    [
        (_bad(lambda s: s.update({"evil.weight": np.zeros(2, np.float32)})), "unknown keys"),
        (_bad(lambda s: s.update({"head.fc.weight": np.zeros((3, 15), np.float32)})), "shape"),
        (_bad(lambda s: s.update({"head.fc.weight": np.zeros((3, 16), np.float64)})), "dtype"),
        (_bad(lambda s: s["head.fc.bias"].__setitem__(0, np.nan)), "non-finite"),
        (_bad(lambda s: s["head.fc.bias"].__setitem__(1, np.inf)), "non-finite"),
        (_bad(lambda s: s.pop("head.fc.bias")), "incomplete"),
    ],
)
def test_bad_arrays_are_rejected(state, reason):
    with pytest.raises(ReplyRejected, match=reason):
        validate_train_reply(make_reply(3, state), LAYERS)


def test_layers_not_asked_for_or_missing_are_rejected():
    with pytest.raises(ReplyRejected, match="not requested"):
        validate_train_reply(make_reply(3, small_state(1)), LAYERS, allowed=["head.fc"])
    with pytest.raises(ReplyRejected, match="missing"):
        validate_train_reply(make_reply(3, select(small_state(1), LAYERS, ["head.fc"])), LAYERS, required=LAYERS.names)


@pytest.mark.parametrize("num_examples", [0, -5, 1.5, float("nan"), 10**12])
def test_bad_example_counts_are_rejected(num_examples):
    with pytest.raises(ReplyRejected, match="num-examples"):
        validate_train_reply(make_reply(3, small_state(1), num_examples=num_examples), LAYERS)


def test_corrupt_array_bytes_are_rejected():
    reply = make_reply(3, None)
    broken = Array(dtype="float32", shape=(3, 16), stype="numpy.ndarray", data=b"\x00garbage")
    reply.content["arrays"] = ArrayRecord({"head.fc.weight": broken, "head.fc.bias": Array(np.zeros(3, np.float32))})
    with pytest.raises(ReplyRejected, match="does not decode"):
        validate_train_reply(reply, LAYERS)


def test_missing_metrics_and_client_errors_are_rejected():
    sent = Message(RecordDict(), dst_node_id=4, message_type="train")
    no_metrics = Message(RecordDict({"arrays": ArrayRecord()}), reply_to=sent)
    with pytest.raises(ReplyRejected, match="MetricRecord"):
        validate_train_reply(no_metrics, LAYERS)
    failed = Message(Error(code=0, reason="out of memory"), reply_to=sent)
    with pytest.raises(ReplyRejected, match="client error: out of memory"):
        validate_train_reply(failed, LAYERS)


def test_declared_shape_must_match_the_data():
    reply = make_reply(3, select(small_state(1), LAYERS, ["head.fc"]))
    bias = reply.content["arrays"]["head.fc.bias"]
    lying = Array(dtype=bias.dtype, shape=(2**31,), stype=bias.stype, data=bias.data)
    reply.content["arrays"] = ArrayRecord({"head.fc.weight": reply.content["arrays"]["head.fc.weight"], "head.fc.bias": lying})
    with pytest.raises(ReplyRejected, match="declares"):
        validate_train_reply(reply, LAYERS)


@pytest.mark.parametrize("seconds", [-0.5, float("nan"), float("inf")])
def test_a_bad_training_time_is_refused(seconds):
    with pytest.raises(ReplyRejected, match="train-seconds"):
        validate_train_reply(make_reply(3, small_state(1), metrics={"train-seconds": seconds}), LAYERS)
    assert validate_train_reply(make_reply(3, small_state(1), metrics={"train-seconds": 0.25}), LAYERS).num_examples == 10
