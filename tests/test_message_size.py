"""Message sizes computed from Flower's format equal Flower's own serialisation, for every record kind."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedlayer.config import compose_config
from fedlayer.wire.records import PAYLOAD_RECORDS
from fedlayer.traffic.size import MessageSize, measure_message
from tests.inprocess import InProcessGrid, run_in_process

PAYLOAD = PAYLOAD_RECORDS[0]


def flower_bytes(obj) -> int:
    """What Flower ships for ``obj``: its distinct nested objects (by object id), each serialised."""
    return sum(len(o.deflate()) for o in get_all_nested_objects(obj).values())


def flower_size(message: Message) -> MessageSize:
    """``measure_message``'s numbers, each from Flower's own serialisation and object ids."""
    size = MessageSize(total=flower_bytes(message))
    if not message.has_error():
        for name in PAYLOAD_RECORDS:
            if name in message.content:
                record = message.content[name]
                size.payload += flower_bytes(record)
                if isinstance(record, ArrayRecord):
                    size.by_key.update({key: flower_bytes(array) for key, array in record.items()})
    return size


def every_kind() -> RecordDict:
    """Arrays of every dtype and shape, equal arrays and chunks, arrays over the chunk size, and records of every kind."""
    rng = np.random.default_rng(0)
    trained = rng.standard_normal((40, 30)).astype(np.float32)
    over_chunk = FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE // 4 + 1000
    arrays = {
        "w": Array(trained),
        "w-again": Array(trained.copy()),  # equal content: one object
        "other": Array(rng.standard_normal((40, 30)).astype(np.float32)),  # same length, other bytes
        "scalar": Array(np.array(3.5, dtype=np.float32)),
        "empty": Array(np.zeros((0, 4), dtype=np.float32)),
        "count": Array(np.array([7], dtype=np.int64)),
        "mask": Array(np.array([True, False, True])),
        "half": Array(rng.standard_normal(17).astype(np.float16)),
        "raw": Array(dtype="uint8", shape=(11,), stype="bitpack", data=bytes(range(11))),
        "ünïcode key \"quoted\"": Array(np.arange(5, dtype=np.int32)),
        "zeros-3-chunks": Array(np.zeros(3 * over_chunk, dtype=np.float32)),  # two equal chunks
        "big": Array(rng.standard_normal(over_chunk).astype(np.float32)),
        "big-same-tail": Array(np.concatenate([np.ones(over_chunk - 10, np.float32), np.zeros(10, np.float32)])),
        "big-other-tail": Array(np.concatenate([np.ones(over_chunk - 10, np.float32), np.full(10, 2, np.float32)])),
    }
    config = {"server-round": 3, "lr": 0.05, "name": "fedavg", "flag": True, "blob": b"\x00\xffbytes",
              "ints": [1, 2, 3], "floats": [0.5, 1.5], "names": ["a", "b"], "bools": [True, False], "blobs": [b"x", b"yz"]}
    return RecordDict({
        PAYLOAD: ArrayRecord(arrays),
        "other-arrays": ArrayRecord({"w": Array(trained.copy()), "count": Array(np.array([7], dtype=np.int64))}),
        "same-record": ArrayRecord({"w": Array(trained.copy()), "count": Array(np.array([7], dtype=np.int64))}),
        "config": ConfigRecord(config),
        "config-again": ConfigRecord(dict(config)),
        "metrics": MetricRecord({"num-examples": 250, "loss": 0.25, "per-class": [0.5, 0.75], "counts": [1, 2]}),
        "empty-metrics": MetricRecord({}),
    })


def messages() -> dict[str, Message]:
    """A train message of every record kind, its reply, an error reply, an evaluate message without payload, an empty one."""
    sent = Message(every_kind(), dst_node_id=1_000_000_000_003, message_type=MessageType.TRAIN, group_id="round-3")
    sent.metadata.__dict__["_message_id"] = "m" * 36  # as after a push (the id is not serialised)
    return {
        "train": sent,
        "reply": Message(every_kind(), reply_to=sent),
        "error": Message(Error(code=3, reason="ClientApp raised <'ünïcode'>"), reply_to=sent),
        "evaluate": Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=7, message_type=MessageType.EVALUATE),
        "empty": Message(RecordDict(), dst_node_id=7, message_type=MessageType.QUERY),
    }


@pytest.mark.parametrize("kind", ["train", "reply", "error", "evaluate", "empty"])
def test_sizes_equal_flowers_serialisation(kind):
    message = messages()[kind]
    assert measure_message(message) == flower_size(message)


def test_measuring_leaves_the_message_as_it_was():
    """Nothing is serialised or hashed: no object id or chunk list is cached in the message's
    objects, so measuring may run while the simulation engine pickles the same message."""
    message = messages()["reply"]
    measure_message(message)
    objects = [message, message.content, *message.content.values()]
    objects += [array for record in message.content.values() if isinstance(record, ArrayRecord) for array in record.values()]
    assert [o for o in objects if {"_object_id", "_chunks"} & set(vars(o))] == []


class CheckingGrid(InProcessGrid):
    """The in-process grid, checking each message pushed and each reply against Flower's serialisation."""

    checked: list[int] = []  # messages checked, over every run (a class attribute: run_in_process builds the grid)

    def push_messages(self, messages):
        messages = list(messages)
        ids = list(super().push_messages(messages))
        for message in messages:
            assert measure_message(message) == flower_size(message)
            self.checked.append(1)
        for message_id in ids:
            if message_id in self._replies:
                assert measure_message(self._replies[message_id]) == flower_size(self._replies[message_id])
                self.checked.append(1)
        return ids


@pytest.mark.parametrize("overrides", [
    ["strategy=fedavg", "federation.fraction_evaluate=1.0"],
    ["strategy=fedlp", "strategy.scheme=heterogeneous"],
    ["strategy=laq"],
    ["strategy=pfedla"],
    ["strategy=fll", "strategy.rounds_per_stage=1"],
    ["strategy=fedavg", "codec=max"],
    ["strategy=fedavg", "privacy.mode=local", "privacy.noise_multiplier=0.5"],
], ids=lambda o: " ".join(o))
def test_every_message_of_a_run_measures_as_flower_serialises_it(overrides, tmp_path, monkeypatch):
    """Each method's real messages (and the codec's, and privacy's), both ways, checked one by one."""
    import tests.inprocess

    monkeypatch.setattr(tests.inprocess, "InProcessGrid", CheckingGrid)
    monkeypatch.setattr(CheckingGrid, "checked", [])
    cfg = compose_config([*overrides, "dataset=digits", "model=cnn", "federation.num_clients=2", "federation.rounds=2",
                          "train.local_steps=1", "evaluation.max_examples=50", f"output_dir={tmp_path}"])
    run, summary = run_in_process(cfg)
    assert summary["bytes_total"] > 0 and len(CheckingGrid.checked) >= 8  # 2 rounds: 2 train messages and 2 replies each
