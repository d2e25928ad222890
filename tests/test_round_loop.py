"""The round loop's bookkeeping: replies that count, metrics that are JSON, cohorts, identities."""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
from sklearn.datasets import load_digits

from fedlayer.client.app import make_client_app
from fedlayer.config import compose_config
from fedlayer.layers import states_equal
from fedlayer.methods.base import LayerwiseStrategy
from fedlayer.methods.pfedla import PFedLAStrategy
from fedlayer.server.loop import FederatedRun
from fedlayer.server.rundir import RunDirectory
from tests.conftest import small_state
from tests.inprocess import InProcessGrid

COMMON = ["dataset=digits", "model=linear", "train.local_steps=2", "evaluation.max_examples=100"]


def _strict(line: str) -> dict:
    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(line, parse_constant=refuse)


def test_min_replies_counts_only_replies_without_error(tmp_path):
    """Of two nodes one fails (a bad device in its node config): 1 good reply < min_replies=2."""
    cfg = compose_config([*COMMON, f"output_dir={tmp_path}", "run_name=run", "federation.num_clients=2",
                          "federation.rounds=1", "federation.min_replies=2"])
    run = FederatedRun(cfg)
    before = dict(run.strategy.global_state)
    node_config = lambda p: {"partition-id": p, "num-partitions": 2, **({"device": "tpu"} if p == 1 else {})}  # noqa: E731
    run.run(InProcessGrid(make_client_app(cfg), 2, node_config=node_config))
    (record,) = RunDirectory(tmp_path / "run").read_metrics()
    assert record["replies"] == 2 and record["error_replies"] == 1 and record["train"] is None
    assert states_equal(run.strategy.global_state, before)


def test_non_finite_metrics_are_written_as_null_and_counted(tmp_path):
    rundir = RunDirectory(tmp_path)
    replaced = rundir.append_metrics({"round": 1, "train": {"train-loss": float("nan"), "x": np.float32("inf")}, "ok": 1.0})
    assert replaced == ["train.train-loss", "train.x"]
    (line,) = (tmp_path / "metrics.jsonl").read_text().splitlines()
    record = _strict(line)
    assert record["train"] == {"train-loss": None, "x": None} and record["nonfinite"] == replaced


def test_federated_evaluation_does_not_change_the_training_cohorts():
    nodes = list(range(100, 110))
    cohorts = []
    for fraction_evaluate in (0.0, 0.5):
        strategy = LayerwiseStrategy(small_state(), fraction_train=0.3, fraction_evaluate=fraction_evaluate, seed=3)
        strategy.client_of = {n: i for i, n in enumerate(nodes)}
        rounds = []
        for server_round in range(1, 5):
            rounds.append(sorted(m.metadata.dst_node_id for m in strategy.configure_train(server_round, nodes)))
            strategy.configure_evaluate(server_round, nodes)
        cohorts.append(rounds)
    assert cohorts[0] == cohorts[1]


def test_constructing_pfedla_creates_no_directory():
    before = set(os.listdir(tempfile.gettempdir()))
    PFedLAStrategy(small_state(), num_clients=3)
    assert set(os.listdir(tempfile.gettempdir())) == before


def test_nodes_without_partition_ids_get_server_assigned_ids_they_keep(tmp_path):
    """Two devices with their own data and their own state folders, no partition ids.

    They get client ids 0 and 1 (not both 0), keep their state under those
    ids, and after a restart (new node ids) answer the query with them.
    """
    digits = load_digits()
    data = tmp_path / "digits.npz"
    np.savez(data, x=digits.images.astype(np.float32), y=digits.target)
    overrides = [*COMMON, "dataset=local", f"dataset.path={data}", f"output_dir={tmp_path}",
                 "federation.num_clients=2", "federation.rounds=2", "strategy=laq", "strategy.mode=delta", "strategy.alpha=0.5"]
    node_config = lambda p: {"data-path": str(data), "state-dir": str(tmp_path / f"device-{p}")}  # noqa: E731
    identities = []
    for run_name, first_node in (("first", 5_000_000_000_000), ("restarted", 7_000_000_000_000)):
        cfg = compose_config([*overrides, f"run_name={run_name}"])
        run = FederatedRun(cfg)
        summary = run.run(InProcessGrid(make_client_app(cfg), 2, node_config=node_config, first_node_id=first_node))
        assert summary["rejected_replies"] == 0
        identities.append({node - first_node: client for node, client in run.strategy.client_of.items()})
        assert run.strategy.round_record(2)["uploads"] + run.strategy.round_record(2)["skips"] == 2
    assert identities[0] == identities[1] and sorted(identities[0].values()) == [0, 1]
    for device, client in identities[0].items():
        folder = tmp_path / f"device-{device}"
        assert (folder / "client-id").read_text() == str(client)
        assert (folder / f"client-{client:05d}").is_dir() and not (folder / "partition-00000").exists()
