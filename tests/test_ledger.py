"""The byte ledger measures serialised messages and the FedAvg equivalent."""

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedlayer.layers import ModelLayers, select, to_arrayrecord
from fedlayer.traffic import ByteLedger, message_bytes
from fedlayer.traffic.size import object_tree_bytes, trained_model_bytes
from tests.conftest import make_reply, small_state


def _ledger():
    state = small_state()
    layers = ModelLayers.from_state(state)
    return ByteLedger(layers, object_tree_bytes(to_arrayrecord(state))), layers, state


def _down(state):
    return Message(RecordDict({"arrays": to_arrayrecord(state), "config": ConfigRecord({"server-round": 1})}), dst_node_id=5, message_type=MessageType.TRAIN)


def test_full_model_messages_equal_their_fedavg_equivalent():
    ledger, _, state = _ledger()
    down = _down(state)
    size = ledger.record_down(1, down)
    assert size == message_bytes(down) > ledger.full_model_bytes
    up = make_reply(5, state)
    ledger.record_up(1, up)
    traffic = ledger.rounds[1]
    assert traffic.bytes_down == traffic.fedavg_bytes_down == size
    assert traffic.bytes_up == traffic.fedavg_bytes_up == message_bytes(up)


def test_fedavg_equivalent_counts_arrays_that_are_equal_only_before_training():
    """BatchNorm starts with equal arrays (zero means, unit variances) that Flower stores
    once; trained, they differ. A FedAvg upload of the trained model is the unit."""
    import torch

    from fedlayer.layers import torch_state_to_numpy

    initial = torch_state_to_numpy(torch.nn.Sequential(torch.nn.BatchNorm1d(50), torch.nn.BatchNorm1d(50)).state_dict())
    rng = np.random.default_rng(3)
    trained = {k: (v + rng.normal(size=v.shape)).astype(v.dtype) if v.dtype.kind == "f" else v for k, v in initial.items()}
    assert object_tree_bytes(to_arrayrecord(initial)) < object_tree_bytes(to_arrayrecord(trained))
    assert trained_model_bytes(initial) == object_tree_bytes(to_arrayrecord(trained))
    ledger = ByteLedger(ModelLayers.from_state(initial), trained_model_bytes(initial))
    reply = make_reply(5, trained)
    ledger.record_up(1, reply)
    assert ledger.rounds[1].fedavg_bytes_up == ledger.rounds[1].bytes_up == message_bytes(reply)


def test_evaluation_replies_carry_no_model_in_fedavg_either():
    ledger, _, state = _ledger()
    sent = Message(RecordDict({"arrays": to_arrayrecord(state)}), dst_node_id=5, message_type=MessageType.EVALUATE)
    reply = Message(RecordDict({"metrics": MetricRecord({"accuracy": 0.5, "num-examples": 10})}), reply_to=sent)
    ledger.record_down(1, sent)
    ledger.record_up(1, reply)
    traffic = ledger.rounds[1]
    assert traffic.fedavg_bytes_up == traffic.bytes_up == message_bytes(reply) < ledger.full_model_bytes
    assert traffic.fedavg_bytes_down == traffic.bytes_down
    ledger.record_up(2, make_reply(6, None))  # a train reply without a model: FedAvg would have uploaded one
    assert ledger.rounds[2].fedavg_bytes_up > ledger.full_model_bytes


def test_partial_messages_cost_less_and_are_attributed_to_layers():
    ledger, layers, state = _ledger()
    ledger.record_down(1, _down(select(state, layers, ["head.fc"])))
    ledger.record_up(1, make_reply(5, select(state, layers, ["head.fc"])))
    ledger.record_up(2, make_reply(6, None))
    traffic = ledger.rounds[1]
    assert traffic.bytes_down < traffic.fedavg_bytes_down
    assert set(traffic.layer_bytes_down) == {"head.fc"} == set(traffic.layer_bytes_up)
    assert traffic.layer_bytes_up["head.fc"] > 3 * 17 * 4  # at least the raw floats
    totals = ledger.totals()
    assert totals["bytes_up"] == traffic.bytes_up + ledger.rounds[2].bytes_up
    assert totals["fedavg_bytes_up"] - totals["bytes_up"] > 0


def test_client_reported_sizes_and_checkpoint_round_trip():
    ledger, layers, state = _ledger()
    reply = make_reply(5, state)
    from flwr.app import MetricRecord

    reply.content["traffic"] = MetricRecord({"bytes-received": 1234, "bytes-sent": 999})
    ledger.record_up(3, reply)
    assert ledger.totals()["client_reported_down"] == 1234
    restored, _, _ = _ledger()
    restored.load_state_dict(ledger.state_dict())
    assert restored.totals() == ledger.totals()
    assert restored.rounds[3].layer_bytes_up == ledger.rounds[3].layer_bytes_up


def test_every_byte_of_fedlps_level_heads_is_filed_under_its_layer(fedlp_runtime, fedlp_initial):
    """Heterogeneous FedLP sends and returns level heads, which are not layers of the global model:
    the ledger names them (``exchanged_layers``), so no byte is filed under a layer of no name."""
    from fedlayer.methods.fedlp import FedLPStrategy
    from fedlayer.traffic.size import measure_message

    strategy = FedLPStrategy(fedlp_initial, model=fedlp_runtime.new_model(), scheme="heterogeneous", level_preference=[1.0, 0.0])
    ledger = ByteLedger(strategy.exchanged_layers(), trained_model_bytes(strategy.fedavg_state()))
    strategy.client_of = {5: 0, 6: 1}
    messages = strategy.configure_train(1, [5, 6])
    replies = [make_reply(m.metadata.dst_node_id, {k: v.numpy() for k, v in m.content["arrays"].items()}) for m in messages]
    for message, reply in zip(messages, replies):
        ledger.record_down(1, message)
        ledger.record_up(1, reply)
    traffic = ledger.rounds[1]
    named = set(strategy.exchanged_layers().names)
    for recorded, sent in ((traffic.layer_bytes_down, messages), (traffic.layer_bytes_up, replies)):
        assert "level-heads.1" in recorded and set(recorded) <= named
        assert sum(recorded.values()) == sum(sum(measure_message(m).by_key.values()) for m in sent)
