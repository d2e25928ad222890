"""Per-node state on disk: a restarted client continues exactly where it was."""

from __future__ import annotations

import torch
from flwr.app import ConfigRecord, Context, MessageType, RecordDict

from fedlayer.client.runtime import state_files
from fedlayer.client.state import NodeStateFiles
from fedlayer.config import compose_config
from fedlayer.layers import from_arrayrecord, states_equal, torch_state_to_numpy
from fedlayer.methods.client_half import (
    ClientRuntime,
    load_local_model,
    save_local_model,
    standard_train,
)
from fedlayer.methods.fedavg import FedAvgStrategy
from fedlayer.methods.fedlama import FedLAMAStrategy
from tests.conftest import small_state


#: The run the state files belong to (``wire.records.RUN_KEY``).
RUN_KEY = "0123456789abcdef"


def _context(node_id: int = 7, node_config: dict | None = None) -> Context:
    return Context(run_id=1, node_id=node_id, node_config=node_config or {}, state=RecordDict(), run_config={})


def _saved_after(files: NodeStateFiles, server_round: int, seed: int) -> None:
    context = _context()
    save_local_model(context, small_state(seed))
    context.state["memory"] = ConfigRecord({"clock": server_round})  # a method's small memory
    files.save(context, server_round)


def test_restore_takes_the_newest_round_before_the_one_asked(tmp_path):
    files = NodeStateFiles(tmp_path, keep=3)
    for server_round in (1, 2, 4):
        _saved_after(files, server_round, seed=server_round)

    for before, expected in ((5, 4), (4, 2), (3, 2), (2, 1)):
        context = _context()
        assert files.restore(context, before=before) == expected
        assert states_equal(load_local_model(context), small_state(expected))
        assert context.state.config_records["memory"]["clock"] == expected
    assert files.restore(_context(), before=1) is None  # nothing saved before round 1


def test_restore_never_overwrites_a_live_state(tmp_path):
    files = NodeStateFiles(tmp_path)
    _saved_after(files, 1, seed=1)
    live = _context()
    save_local_model(live, small_state(9))
    assert files.restore(live, before=2) is None
    assert states_equal(load_local_model(live), small_state(9))


def test_a_repeated_round_replaces_what_a_crashed_run_left(tmp_path):
    files = NodeStateFiles(tmp_path, keep=5)
    for server_round in (1, 2, 3):
        _saved_after(files, server_round, seed=server_round)
    # The server died before its round-2 checkpoint: the resumed run repeats round 2.
    context = _context()
    assert files.restore(context, before=2) == 1
    save_local_model(context, small_state(20))
    files.save(context, 2)
    assert files.rounds() == [1, 2]
    restored = _context()
    assert files.restore(restored, before=3) == 2
    assert states_equal(load_local_model(restored), small_state(20))


def test_only_the_newest_files_are_kept_and_an_empty_state_writes_nothing(tmp_path):
    files = NodeStateFiles(tmp_path, keep=2)
    for server_round in range(1, 6):
        _saved_after(files, server_round, seed=server_round)
    assert files.rounds() == [4, 5]
    files.save(_context(), 6)
    assert files.rounds() == [4, 5]
    assert not list(tmp_path.glob("*.tmp"))


def _runtime(cfg_overrides: list[str], state_dir) -> tuple[ClientRuntime, NodeStateFiles | None]:
    """Partition 3's runtime, and its state files in ``state_dir`` (the node config's ``state-dir``)."""
    cfg = compose_config(["dataset=digits", "federation.num_clients=10", "train.local_steps=2", *cfg_overrides])
    runtime = ClientRuntime(cfg=cfg, partition_id=3, num_partitions=10, data_path=None, device=torch.device("cpu"))
    return runtime, state_files(_context(node_config={"partition-id": 3, "state-dir": str(state_dir)}), cfg, 3, RUN_KEY)


def _train_content(strategy, server_round: int, node: int = 7) -> RecordDict:
    """The content of the train message ``strategy`` sends ``node`` (identified as client 3) in ``server_round``."""
    strategy.client_of[node] = 3
    (message,) = strategy.build_messages(server_round, {node: strategy.plan(server_round, node)}, MessageType.TRAIN)
    return message.content


def test_fedlama_client_restarted_between_rounds_replies_as_if_it_never_stopped(tmp_path):
    """Round 4 sends no head.fc1 down: the client must continue from its own round-3 copy."""
    runtime, files = _runtime(["strategy=fedlama"], tmp_path)
    initial = torch_state_to_numpy(runtime.new_model().state_dict())
    lama = FedLAMAStrategy(initial, phi=2, local_steps=2)
    lama.intervals["head.fc1"] = 2
    assert files is not None and files.root == tmp_path / f"run-{RUN_KEY}" / "partition-00003"

    def train(server_round: int, context: Context) -> RecordDict:
        files.restore(context, before=server_round)
        content = _train_content(lama, server_round)
        reply = standard_train(runtime, content, context)
        files.save(context, server_round)
        return reply

    alive = _context()
    train(3, alive)
    uninterrupted = from_arrayrecord(train(4, alive)["arrays"])
    restarted = from_arrayrecord(train(4, _context())["arrays"])  # a new process: empty context.state
    assert "head.fc1.weight" in restarted
    assert states_equal(restarted, uninterrupted)
    forgetful = from_arrayrecord(standard_train(runtime, _train_content(lama, 4), _context())["arrays"])
    assert not states_equal(forgetful, uninterrupted)  # without the files the restart would show


def test_fedavg_clients_keep_no_model_between_rounds(tmp_path):
    runtime, files = _runtime(["strategy=fedavg"], tmp_path)
    initial = torch_state_to_numpy(runtime.new_model().state_dict())
    fedavg = FedAvgStrategy(initial)
    context = _context()
    standard_train(runtime, _train_content(fedavg, 1), context)
    files.save(context, 1)
    assert load_local_model(context) is None
    assert files.rounds() == []
