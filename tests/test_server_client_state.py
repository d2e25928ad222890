"""Per-client server state on disk beyond a memory budget: same results, bounded memory."""

from __future__ import annotations

import numpy as np

from fedlayer.server_client_state import ClientStates
from fedlayer.config import compose_config
from fedlayer.layers import states_equal
from tests.inprocess import run_in_process


def _state(seed: int) -> dict[str, np.ndarray]:
    return {"w": np.random.default_rng(seed).standard_normal(1000).astype(np.float32)}  # 4,000 bytes


def test_states_beyond_the_budget_live_on_disk_and_read_back(tmp_path):
    store = ClientStates("s", budget_bytes=10_000)
    store.attach(tmp_path)
    for client in range(10):
        store.put(client, _state(client), version=1)
    assert store.cached_bytes <= 10_000 and len(store.cache) == 2  # the two most recent
    assert store.clients() == list(range(10)) and 3 in store and 11 not in store
    for client in range(10):
        assert states_equal(store[client], _state(client))
    assert len(list((tmp_path / "s").glob("client-*.npz"))) == 10


def test_the_checkpoint_names_versions_and_a_restore_drops_later_files(tmp_path):
    store = ClientStates("s", budget_bytes=0)
    store.attach(tmp_path)
    store.put(1, _state(1), version=1)
    checkpoint = store.state_dict()
    store.put(1, _state(2), version=2)  # a round the crashed run never checkpointed
    store.put(2, _state(3), version=2)
    restored = ClientStates("s", budget_bytes=0)
    restored.attach(tmp_path)
    restored.load_state_dict(checkpoint)
    assert restored.clients() == [1] and states_equal(restored[1], _state(1))
    assert not (tmp_path / "s" / "client-00001.v000002.npz").exists()


def test_a_run_with_a_memory_budget_of_0_ends_on_the_unlimited_runs_model(tmp_path):
    """LAQ (stored updates) with the codec (references), partial participation: every state on disk."""
    common = ["dataset=digits", "model=linear", "strategy=laq", "strategy.mode=delta", "strategy.alpha=0.25",
              "federation.num_clients=6", "federation.fraction_train=0.5", "federation.rounds=4",
              "train.local_steps=3", "codec.up_bits=8", "codec.down_bits=8", f"output_dir={tmp_path}"]
    runs = {}
    for name, budget in (("unlimited", "null"), ("zero", "0")):
        run, summary = run_in_process(compose_config([*common, f"run_name={name}", f"server_state.memory_mb={budget}"]))
        assert summary["rejected_replies"] == 0
        runs[name] = run
    assert states_equal(runs["unlimited"].strategy.global_state, runs["zero"].strategy.global_state)
    zero = runs["zero"].strategy
    assert zero.qhat.cache == {} and zero.codec.references.cache == {}  # nothing held in memory
    assert len(list((tmp_path / "zero" / "server-state" / "laq-qhat").glob("*.npz"))) >= len(zero.qhat) > 0
    assert len(list((tmp_path / "zero" / "server-state" / "codec-references").glob("*.npz"))) > 0
