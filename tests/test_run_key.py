"""Nodes key their saved round state by the fedlayer run (issue 27): runs sharing a state folder never mix.

The server gives every run a key (kept in its run directory, so ``resume=``
keeps it) and sends it in every round config; a node keeps its round state in
``<state folder>/run-<key>/partition-NNNNN``.
"""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Context, RecordDict

from fedlayer.client.runtime import KEEP_RUNS, state_files
from fedlayer.client.state import NodeStateFiles
from fedlayer.config import compose_config
from fedlayer.layers import states_equal
from fedlayer.methods.client_half import round_config
from fedlayer.server.rundir import RunDirectory
from fedlayer.wire.messages import MessageError
from fedlayer.wire.records import CONFIG, METHOD, RUN_KEY, SERVER_ROUND
from tests.inprocess import run_in_process

#: With the codec on, clients keep their reference and error-feedback residual between rounds.
COMMON = ["dataset=digits", "model=cnn", "federation.num_clients=4", "federation.rounds=3", "strategy=fedavg",
          "codec.up_bits=4", "codec.down_bits=8"]


def test_a_run_does_not_restore_the_round_state_an_earlier_run_left_in_the_same_state_folder(tmp_path):
    """Run 1 trains every client every round and saves their state; run 2 samples half of them, so some
    train first after round 1, with an empty ``context.state``: they must start clean, exactly as with a
    state folder of their own (old code: they restored run 1's state of the round before)."""
    shared = tmp_path / "state-shared"
    run_in_process(compose_config([*COMMON, "federation.fraction_train=1.0", f"output_dir={tmp_path}",
                                   "run_name=first", f"client_state_dir={shared}"]))
    second = [*COMMON, "federation.fraction_train=0.5", f"output_dir={tmp_path}"]
    after_first, _ = run_in_process(compose_config([*second, "run_name=second", f"client_state_dir={shared}"]))
    alone, _ = run_in_process(compose_config([*second, "run_name=alone", f"client_state_dir={tmp_path / 'state-own'}"]))

    clients = {path.parent for path in (tmp_path / "state-own").rglob("round-*.pb")}
    assert any(min(NodeStateFiles(folder).rounds()) > 1 for folder in clients), "a client must first train after round 1"
    assert states_equal(after_first.strategy.global_state, alone.strategy.global_state)  # same machine: bitwise
    assert sorted(p.name for p in shared.glob("run-*")) == sorted(
        f"run-{RunDirectory(tmp_path / name).run_key}" for name in ("first", "second"))


def test_the_run_key_is_made_with_the_run_directory_and_kept_by_resume(tmp_path):
    cfg = compose_config([f"output_dir={tmp_path}", "run_name=r"])
    key = RunDirectory.create(cfg).run_key
    assert len(key) == 16 and int(key, 16) >= 0
    cfg.resume = str(tmp_path / "r")
    assert RunDirectory.create(cfg).run_key == key  # resume= keeps it
    cfg.resume = None
    assert RunDirectory.create(cfg).run_key != key  # a fresh run in the same directory gets a new one


def _message_config(run_key: str | None) -> RecordDict:
    entries = {SERVER_ROUND: 2, METHOD: "fedavg", **({} if run_key is None else {RUN_KEY: run_key})}
    return RecordDict({CONFIG: ConfigRecord(entries)})


@pytest.mark.parametrize("bad", ["../../etc", "0123456789ABCDEF", "0123456789abcde", ""])
def test_a_run_key_that_is_not_16_hex_digits_is_refused(bad):
    with pytest.raises(MessageError, match=RUN_KEY):
        round_config(_message_config(bad))


def test_without_a_run_key_a_node_uses_no_round_state_and_only_the_newest_runs_stay(tmp_path):
    cfg = compose_config([])
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 3, "state-dir": str(tmp_path)},
                      state=RecordDict(), run_config={})
    assert state_files(context, cfg, 3, round_config(_message_config(None)).run_key) is None
    keys = [f"{i:016x}" for i in range(KEEP_RUNS + 2)]
    for key in keys:
        files = state_files(context, cfg, 3, key)
        assert files is not None and files.root == tmp_path / f"run-{key}" / "partition-00003"
    assert sorted(p.name for p in tmp_path.glob("run-*")) == [f"run-{k}" for k in keys[-KEEP_RUNS:]]
