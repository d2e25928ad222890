"""Shared test helpers: real Flower messages built outside a running app."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity

from benchmarks.faults import make_reply as make_reply  # the tests' reply builder lives with the fault builders
from fedlayer.config import compose_config
from fedlayer.layers import State, torch_state_to_numpy
from fedlayer.methods.client_half import ClientRuntime

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
#: ``FEDLAYER_FUZZ=full`` runs property tests with their full example counts.
FULL_FUZZ = os.environ.get("FEDLAYER_FUZZ") == "full"


def fuzz_examples(full: int) -> int:
    """Examples of a property test: ``full`` under ``FEDLAYER_FUZZ=full``, else a tenth (at least 20)."""
    return full if FULL_FUZZ else max(full // 10, 20)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that start real Flower processes run one at a time per kind (``--dist loadgroup``):
    deployments on one xdist worker, simulation-engine runs on one, unit tests beside them."""
    for item in items:
        for kind in ("e2e", "engine"):
            if item.get_closest_marker(kind):
                item.add_marker(pytest.mark.xdist_group(kind))


@pytest.fixture(autouse=True, scope="session")
def _task_identity() -> None:
    """Messages need a run/task identity; the engine sets it, tests set a fake one."""
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 0
    TaskIdentity.task_id = 1


def small_state(seed: int = 0) -> State:
    """A small model state with a conv, a BatchNorm (with int counter) and a linear layer."""
    rng = np.random.default_rng(seed)
    return {
        "blocks.0.conv.weight": rng.standard_normal((4, 1, 3, 3)).astype(np.float32),
        "blocks.0.conv.bias": rng.standard_normal(4).astype(np.float32),
        "blocks.0.bn.weight": rng.standard_normal(4).astype(np.float32),
        "blocks.0.bn.bias": rng.standard_normal(4).astype(np.float32),
        "blocks.0.bn.running_mean": rng.standard_normal(4).astype(np.float32),
        "blocks.0.bn.running_var": rng.random(4).astype(np.float32),
        "blocks.0.bn.num_batches_tracked": np.array(seed, dtype=np.int64),
        "head.fc.weight": rng.standard_normal((3, 16)).astype(np.float32),
        "head.fc.bias": rng.standard_normal(3).astype(np.float32),
    }


#: FedLP's unit-test setting: the cnn (two blocks) on digits, three clients.
FEDLP_OVERRIDES = ["strategy=fedlp", "dataset=digits", "model=cnn", "train.local_steps=2", "federation.num_clients=3"]


@pytest.fixture(scope="module")
def fedlp_runtime() -> ClientRuntime:
    """Partition 0's client runtime in FedLP's unit-test setting."""
    cfg = compose_config(FEDLP_OVERRIDES)
    return ClientRuntime(cfg=cfg, partition_id=0, num_partitions=3, data_path=None, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def fedlp_initial(fedlp_runtime: ClientRuntime) -> State:
    """The initial model of FedLP's unit-test setting."""
    return torch_state_to_numpy(fedlp_runtime.new_model().state_dict())
