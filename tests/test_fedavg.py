"""FedAvg on the layer-wise base gives exactly Flower's FedAvg model."""

import numpy as np
from flwr.serverapp.strategy import FedAvg

from fedlayer.layers import from_arrayrecord, select, states_equal
from fedlayer.methods.aggregation import weighted_layer_average
from fedlayer.methods.fedavg import FedAvgStrategy
from fedlayer.methods.replies import validate_train_reply
from tests.conftest import make_reply, small_state


def _float_state(seed):
    return {k: v for k, v in small_state(seed).items() if v.dtype == np.float32}


def _strategy(initial, server_round=1):
    """FedAvg with nodes 1..3 identified (client ids 0..2) and sent round ``server_round``'s train messages."""
    strategy = FedAvgStrategy(initial)
    strategy.client_of = {node: node - 1 for node in (1, 2, 3)}
    strategy.configure_train(server_round, [1, 2, 3])
    return strategy


def test_same_global_model_as_flower_fedavg():
    strategy = _strategy(_float_state(0))
    replies = [make_reply(node, _float_state(node), num_examples=n, to=strategy) for node, n in ((1, 10), (2, 37), (3, 5))]
    flower_arrays, _ = FedAvg().aggregate_train(1, replies)
    metrics = strategy.aggregate_train(1, replies)
    assert states_equal(strategy.global_state, from_arrayrecord(flower_arrays))
    assert metrics["num-examples"] == 52


def test_bad_reply_is_rejected_and_model_unchanged():
    initial = _float_state(0)
    strategy = _strategy(initial)
    poisoned = _float_state(1)
    poisoned["head.fc.weight"][0, 0] = np.nan
    assert strategy.aggregate_train(1, [make_reply(1, poisoned, to=strategy)]) is None  # no new global model
    assert states_equal(strategy.global_state, initial)
    assert len(strategy.rejections) == 1 and strategy.rejections[0].node_id == 1
    # one good and one bad reply: the average uses only the good one
    strategy.configure_train(2, [1, 2, 3])
    strategy.aggregate_train(2, [make_reply(1, poisoned, to=strategy), make_reply(2, _float_state(2), to=strategy)])
    assert states_equal(strategy.global_state, _float_state(2))
    assert len(strategy.rejections) == 2


def test_partial_replies_average_each_layer_over_its_holders():
    layers = _strategy(_float_state(0)).layers
    a, b = _float_state(1), _float_state(2)
    replies = [
        validate_train_reply(make_reply(1, a, 30), layers),
        validate_train_reply(make_reply(2, select(b, layers, ["head.fc"]), 10), layers),
    ]
    out = weighted_layer_average(replies, layers, layers.names)
    assert np.allclose(out["head.fc.weight"], 0.75 * a["head.fc.weight"] + 0.25 * b["head.fc.weight"], atol=1e-6)
    assert np.array_equal(out["blocks.0.conv.weight"], a["blocks.0.conv.weight"] * np.float32(1.0))


def test_integer_tensors_are_averaged_and_keep_their_dtype():
    state_a, state_b = small_state(2), small_state(4)
    strategy = FedAvgStrategy(small_state(0))
    strategy.client_of = {1: 0, 2: 1}
    strategy.configure_train(1, [1, 2])
    strategy.aggregate_train(1, [make_reply(1, state_a, 1, to=strategy), make_reply(2, state_b, 1, to=strategy)])
    counter = strategy.global_state["blocks.0.bn.num_batches_tracked"]
    assert counter.dtype == np.int64 and int(counter) == 3


def test_reply_from_unasked_node_is_rejected():
    strategy = _strategy(_float_state(0))
    strategy.client_of[99] = 3  # identified, connected, not sampled
    metrics = strategy.aggregate_train(1, [make_reply(99, _float_state(1))])
    assert metrics is None and strategy.rejections[0].reason.startswith("reply from a node that was sent no train message")
    assert states_equal(strategy.global_state, _float_state(0))  # no new global model


def test_a_duplicated_reply_is_rejected_and_counted_once():
    once = _strategy(_float_state(0))
    once.aggregate_train(1, [make_reply(1, _float_state(1), 10, to=once), make_reply(2, _float_state(2), 10, to=once)])
    twice = _strategy(_float_state(0))
    duplicate = make_reply(1, _float_state(1), 10, to=twice)
    twice.aggregate_train(1, [duplicate, make_reply(2, _float_state(2), 10, to=twice), duplicate])
    assert states_equal(twice.global_state, once.global_state)
    assert [(r.node_id, r.reason) for r in twice.rejections] == [(1, "a second reply to the same round")]
