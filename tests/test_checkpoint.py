"""Checkpoints: atomic, checksummed, and a damaged one falls back to the previous."""

import numpy as np
import pytest

from fedlayer.layers import states_equal
from fedlayer.server.checkpoint import (
    Checkpoint,
    CheckpointError,
    CheckpointStore,
    decode_checkpoint,
    encode_checkpoint,
)
from tests.conftest import small_state


def _checkpoint(round_: int) -> Checkpoint:
    return Checkpoint(
        round=round_,
        global_state=small_state(round_),
        strategy_state={"rng": {"state": 123}, "memory": {"3": np.arange(5.0)}, "intervals": [1, 2]},
        ledger_state={"1": {"round": 1, "bytes_up": 10}},
        extra={"last_accuracy": 0.5},
    )


def test_round_trip_keeps_arrays_and_nested_state():
    restored = decode_checkpoint(encode_checkpoint(_checkpoint(3)))
    assert restored.round == 3
    assert states_equal(restored.global_state, small_state(3))
    assert np.array_equal(restored.strategy_state["memory"]["3"], np.arange(5.0))
    assert restored.strategy_state["intervals"] == [1, 2]
    assert restored.ledger_state == {"1": {"round": 1, "bytes_up": 10}}


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty"])
def test_damaged_checkpoint_is_detected(damage):
    data = bytearray(encode_checkpoint(_checkpoint(1)))
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = bytearray()
    with pytest.raises(CheckpointError):
        decode_checkpoint(bytes(data))


def test_store_keeps_newest_and_falls_back_past_a_corrupt_file(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    for r in (1, 2, 3):
        store.save(_checkpoint(r))
    assert [p.name for p in store.paths()] == ["round-000002.ckpt", "round-000003.ckpt"]
    newest = store.paths()[-1]
    newest.write_bytes(newest.read_bytes()[:-100])  # a partial write
    restored = store.latest()
    assert restored is not None and restored.round == 2
    assert states_equal(restored.global_state, small_state(2))
    assert not list(tmp_path.glob("checkpoints/*.tmp"))
