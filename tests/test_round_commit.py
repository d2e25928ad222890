"""A round commits all or nothing, and no huge update gets in however few replies carry it (issue 24, items 1-2).

Every method runs three committed honest rounds through the real
``configure_train``/``aggregate_train`` (so that on-disk stores hold as many
versions as they keep, and a new one would prune the oldest), then a round
4 that must leave no trace: a *dropped* round (two colluding 3e38 updates,
which the median guard cannot tell from honest ones, so the merged model is
refused) and a *refused* round (one reply, 3e38: nothing to compare it with, so it is bounded by what
that tensor's updates measured before and by its own size). After either,
the global model, the method's checkpointed state (``state_dict``, compared
bitwise in this process) and every file under the run directory (pFedLA's
models and hypernetworks, LAQ's stored updates, the codec's references) are
what they were before the round.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks.fault_matrix import files, same
from benchmarks.faults import (
    ROUND_NODES,
    codec_reply,
    honest_state,
    laq_reply,
    laq_state,
    laq_upload,
    round_one_strategy,
    train_reply,
)
from fedlayer.layers import State, copy_state, states_equal
from fedlayer.methods import METHODS
from fedlayer.methods.base import LayerwiseStrategy

NODES = ROUND_NODES[:3]
#: FedLP keeps every layer here, so that two replies carry each one (the sole carrier has its own test).
OVERRIDES = {"fedlp": ("strategy.p=1.0",)}
HUGE = 3e38


def method_state(strategy: LayerwiseStrategy) -> dict[str, Any]:
    """What the strategy checkpoints, less the list of dropped rounds (which records the drop)."""
    state = strategy.state_dict()
    state.pop("dropped_rounds")
    return state


def snapshot(strategy: LayerwiseStrategy, run_dir: Path) -> tuple[State, dict[str, Any], dict[str, bytes]]:
    return copy_state(strategy.global_state), method_state(strategy), files(run_dir)


def assert_unchanged(strategy: LayerwiseStrategy, run_dir: Path, before: tuple[State, dict[str, Any], dict[str, bytes]]) -> None:
    model, state, disk = before
    assert states_equal(strategy.global_state, model)
    after = method_state(strategy)
    assert after.keys() == state.keys()
    for key in state:
        assert same(after[key], state[key]), key
    now = files(run_dir)
    assert sorted(now) == sorted(disk), "files added or removed"
    assert all(now[name] == disk[name] for name in disk), "files changed"


def honest(strategy: LayerwiseStrategy, node: int, seed: int) -> Any:
    """``node``'s honest reply this round (LAQ: an upload of a standard-normal gradient)."""
    if strategy.method == "laq":
        return laq_reply(node, strategy.client_of[node], laq_upload(laq_state(seed, strategy.shapes), bits=strategy.options.bits)[0], to=strategy)
    return train_reply(strategy, node, honest_state(strategy, node, seed), 10)


def huge(strategy: LayerwiseStrategy, node: int) -> Any:
    """``node``'s reply with every float value 3e38 (local-only, which asks for nothing, is sent the model anyway)."""
    if strategy.method == "laq":
        g = {key: np.full(shape, HUGE, np.float32) for key, shape in strategy.shapes.items()}
        return laq_reply(node, strategy.client_of[node], laq_upload(g, bits=strategy.options.bits)[0], to=strategy)
    state = honest_state(strategy, node, 0) or copy_state(strategy.global_state)
    return train_reply(strategy, node, {k: np.full_like(v, HUGE) if v.dtype == np.float32 else v for k, v in state.items()}, 10)


def after_honest_rounds(name: str, run_dir: Path) -> LayerwiseStrategy:
    """The strategy after committed honest rounds 1-3, configured for round 4."""
    strategy = round_one_strategy(name, run_dir, NODES, OVERRIDES.get(name, ()))
    for server_round in (1, 2, 3):
        if server_round > 1:
            strategy.configure_train(server_round, NODES)
        strategy.aggregate_train(server_round, [honest(strategy, node, seed) for seed, node in enumerate(NODES)])
    assert strategy.dropped_rounds == [] and strategy.rejections == []
    strategy.configure_train(4, NODES)
    return strategy


@pytest.mark.parametrize("name", sorted(set(METHODS) - {"local"}))  # local-only merges nothing: no round to drop
def test_a_dropped_round_leaves_the_method_state_and_its_files_as_they_were(name, tmp_path):
    strategy = after_honest_rounds(name, tmp_path)
    assert strategy.norm_history, "the honest rounds' update norms are kept"
    before = snapshot(strategy, tmp_path)
    strategy.aggregate_train(4, [huge(strategy, NODES[0]), huge(strategy, NODES[1])])
    assert strategy.rejections == [] and strategy.dropped_rounds == [4]
    assert_unchanged(strategy, tmp_path, before)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_refused_round_leaves_the_method_state_and_its_files_as_they_were(name, tmp_path):
    strategy = after_honest_rounds(name, tmp_path)
    before = snapshot(strategy, tmp_path)
    assert strategy.aggregate_train(4, [huge(strategy, NODES[0])]) is None
    assert [r.node_id for r in strategy.rejections] == [NODES[0]] and strategy.dropped_rounds == []
    assert_unchanged(strategy, tmp_path, before)


@pytest.mark.parametrize("dropped", [True, False], ids=["dropped", "refused"])
def test_the_codec_references_stay_after_a_dropped_or_refused_round(dropped, tmp_path):
    """The clients' new references are taken on only with a committed round."""
    strategy = round_one_strategy("fedavg", tmp_path, NODES, ("codec.up_bits=8", "codec.down_bits=8"))
    before = snapshot(strategy, tmp_path)
    repliers = NODES[:2] if dropped else NODES[:1]
    bad = {key: np.full_like(value, HUGE) if value.dtype == np.float32 else value for key, value in strategy.global_state.items()}
    strategy.aggregate_train(1, [codec_reply(strategy, node, bad) for node in repliers])
    assert strategy.dropped_rounds == ([1] if dropped else [])
    assert_unchanged(strategy, tmp_path, before)
    assert strategy.codec is not None and strategy.codec.versions == {}


@pytest.mark.parametrize("kind", ["huge", "scaled"])
def test_a_sole_reply_with_a_huge_update_is_refused(kind, tmp_path):
    """One reply (``min_replies`` defaults to 1): no median to compare with, yet 3e38 or x1e6 is refused."""
    strategy = round_one_strategy("fedavg", tmp_path, NODES)
    start = copy_state(strategy.global_state)
    node = NODES[0]
    state = honest_state(strategy, node, 0)
    if kind == "huge":
        state = {k: np.full_like(v, HUGE) if v.dtype == np.float32 else v for k, v in state.items()}
    else:
        state = {k: (start[k] + (v - start[k]) * 1e6).astype(v.dtype) for k, v in state.items()}
    assert strategy.aggregate_train(1, [train_reply(strategy, node, state, 10)]) is None
    assert [r.node_id for r in strategy.rejections] == [node]
    assert "no other reply carries it" in strategy.rejections[0].reason
    assert states_equal(strategy.global_state, start)


def test_an_honest_sole_reply_is_accepted(tmp_path):
    strategy = round_one_strategy("fedavg", tmp_path, NODES)
    state = honest_state(strategy, NODES[0], 0)
    assert strategy.aggregate_train(1, [train_reply(strategy, NODES[0], state, 10)]) is not None
    assert strategy.rejections == [] and states_equal(strategy.global_state, {**strategy.global_state, **state})


@pytest.mark.parametrize("kind", ["huge", "scaled"])
def test_a_fedlp_layer_only_one_node_carries_cannot_bring_a_huge_update(kind, tmp_path):
    """FedLP (p=0.5): the attacker alone kept some layer; its other layers are honest, so the
    round's medians pass it, and only the bound on a sole carrier refuses it."""
    probe = round_one_strategy("fedlp", tmp_path / "probe", ROUND_NODES)
    kept = {node: set(probe.plans[node].request) for node in ROUND_NODES}
    layer, attacker = next(
        (name, node) for name in probe.layers.names for node in ROUND_NODES
        if name in kept[node] and any(name not in kept[n] for n in ROUND_NODES)
    )
    others = [n for n in ROUND_NODES if layer not in kept[n]]
    runs = {}
    for label in ("mixed", "alone"):
        strategy = round_one_strategy("fedlp", tmp_path / label, ROUND_NODES)
        replies = [train_reply(strategy, n, honest_state(strategy, n, i), 10) for i, n in enumerate(others)]
        if label == "mixed":
            state = honest_state(strategy, attacker, 99)
            for key in strategy.layers[layer].keys:
                sent = strategy.sent_value(attacker, key)
                state[key] = np.full_like(sent, HUGE) if kind == "huge" else (sent + (state[key] - sent) * 1e6).astype(sent.dtype)
            replies.append(train_reply(strategy, attacker, state, 10))
        strategy.aggregate_train(1, replies)
        runs[label] = strategy
    assert [r.node_id for r in runs["mixed"].rejections] == [attacker]
    assert "no other reply carries it" in runs["mixed"].rejections[0].reason
    assert runs["alone"].rejections == []
    assert states_equal(runs["mixed"].global_state, runs["alone"].global_state)



def test_the_norm_history_is_checkpointed(tmp_path):
    """The bound on a sole carrier depends on earlier rounds' norms: a resumed run must have them."""
    from fedlayer.server.checkpoint import Checkpoint, CheckpointStore

    strategy = after_honest_rounds("fedavg", tmp_path / "run")
    assert all(len(norms) == 3 for norms in strategy.norm_history.values())
    store = CheckpointStore(tmp_path / "run")
    store.save(Checkpoint(3, strategy.global_state, strategy.state_dict(), {}, {}))
    resumed = round_one_strategy("fedavg", tmp_path / "resumed", NODES)
    resumed.load_state_dict(store.latest().strategy_state)
    assert resumed.norm_history == strategy.norm_history
