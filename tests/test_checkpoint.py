"""Checkpoints: atomic, checksummed, and a damaged one falls back to the previous."""

import threading

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


def test_a_background_checkpoint_holds_the_state_as_saved_and_is_complete_once_joined(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    for r in (1, 2, 3):
        checkpoint = _checkpoint(r)
        path = store.save_in_background(checkpoint)
        checkpoint.global_state[next(iter(checkpoint.global_state))] += 1.0  # the next round changes the state at once
        checkpoint.strategy_state["memory"]["3"][:] = -1.0
    store.wait()
    assert not [t for t in threading.enumerate() if t.name == "fedlayer-checkpoint"]
    assert [p.name for p in store.paths()] == ["round-000002.ckpt", "round-000003.ckpt"] and path == store.paths()[-1]
    restored = decode_checkpoint(path.read_bytes())
    assert restored.round == 3 and states_equal(restored.global_state, small_state(3))
    assert np.array_equal(restored.strategy_state["memory"]["3"], np.arange(5.0))
    assert not list(tmp_path.glob("checkpoints/*.tmp"))


def test_a_failed_background_write_is_raised_by_the_next_save_and_leaves_the_last_checkpoint(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    store.save_in_background(_checkpoint(1))
    store.wait()
    blocker = store.directory / "round-000002.ckpt.tmp"
    blocker.mkdir()  # the temp file cannot be opened: the write of round 2 fails
    store.save_in_background(_checkpoint(2))
    with pytest.raises(IsADirectoryError):
        store.save_in_background(_checkpoint(3))
    blocker.rmdir()
    restored = store.latest()
    assert restored is not None and restored.round == 1


def test_the_last_checkpoint_is_complete_when_the_run_returns(tmp_path):
    from fedlayer.config import compose_config
    from tests.inprocess import run_in_process

    cfg = compose_config(["dataset=digits", "model=linear", "federation.num_clients=2", "federation.rounds=3",
                          "train.local_steps=1", f"output_dir={tmp_path}", "run_name=r", "logging.tensorboard=false"])
    run, summary = run_in_process(cfg)
    assert not [t for t in threading.enumerate() if t.name == "fedlayer-checkpoint"]
    files = sorted((tmp_path / "r" / "checkpoints").iterdir())
    assert [p.name for p in files] == ["round-000002.ckpt", "round-000003.ckpt"]
    last = decode_checkpoint(files[-1].read_bytes())
    assert last.round == 3 and states_equal(last.global_state, run.strategy.global_state)
