"""Everything a ClientApp call needs: config, its data, its model, its device.

A ClientApp process may live for one message only (deployment starts a fresh
``flwr-clientapp`` per message), so the runtime is rebuilt per call from the
run config and node config; what must persist between rounds lives in
``context.state`` (see ``fedlayer.client.state``).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from flwr.app import Context
from omegaconf import DictConfig

from fedlayer.client.device import resolve_device
from fedlayer.client.state import NodeStateFiles
from fedlayer.client.training import evaluate
from fedlayer.config import compose_config, run_config_to_overrides
from fedlayer.data import ArrayDataset
from fedlayer.layers import ModelLayers, State, numpy_to_torch_state, torch_state_to_numpy
from fedlayer.models import LayeredModel
from fedlayer.workload import build_configured_model, load_workload


@dataclass
class ClientRuntime:
    """The client's view of the run."""

    cfg: DictConfig
    partition_id: int
    num_partitions: int
    data_path: str | None
    device: torch.device
    state_dir: str | None = None

    @classmethod
    def from_context(cls, context: Context, overrides: Sequence[str] | None = None) -> ClientRuntime:
        """Build from Flower's run config and this node's node config.

        Node config keys: ``partition-id`` and ``num-partitions`` (set by the
        simulation engine; given with ``--node-config`` in deployment), optional
        ``data-path`` (the device's own data) and ``device``.
        """
        if overrides is None:
            overrides = run_config_to_overrides(context.run_config)
        cfg = compose_config(overrides)
        node = context.node_config
        num_partitions = int(node.get("num-partitions", cfg.federation.num_clients))
        device = resolve_device(str(node.get("device", cfg.device)))
        if device.type == "cpu":
            torch.set_num_threads(1)
        return cls(
            cfg=cfg,
            partition_id=int(node.get("partition-id", 0)),
            num_partitions=num_partitions,
            data_path=str(node["data-path"]) if "data-path" in node else None,
            device=device,
            state_dir=str(node.get("state-dir", cfg.client_state_dir or "")) or None,
        )

    @property
    def state_files(self) -> NodeStateFiles | None:
        """This node's saved per-round state, when a state folder is configured."""
        if self.state_dir is None:
            return None
        return NodeStateFiles(Path(self.state_dir) / f"partition-{self.partition_id:05d}")

    @cached_property
    def data(self) -> tuple[ArrayDataset, ArrayDataset]:
        """(train, test) data of this client."""
        if self.data_path is not None:
            workload = load_workload(self.cfg, 1, path=self.data_path)
            return workload.client_data(0)
        return load_workload(self.cfg, self.num_partitions).client_data(self.partition_id)

    @property
    def train_data(self) -> ArrayDataset:
        return self.data[0]

    @property
    def test_data(self) -> ArrayDataset:
        return self.data[1]

    def new_model(self) -> LayeredModel:
        """A freshly initialised model (identical to the server's initial one)."""
        return build_configured_model(self.cfg, self.train_data)

    def model_with(self, state: State) -> LayeredModel:
        """A model loaded with a full numpy state."""
        model = self.new_model()
        model.load_state_dict(numpy_to_torch_state(state))
        return model.to(self.device)

    @cached_property
    def layers(self) -> ModelLayers:
        return ModelLayers.from_state(torch_state_to_numpy(self.new_model().state_dict()))

    def reply_metrics(self, model: torch.nn.Module) -> dict[str, float]:
        """What every train reply reports: example count, identity, local-test scores."""
        local = evaluate(model, self.test_data, self.device)
        return {
            "num-examples": float(len(self.train_data)),
            "partition-id": float(self.partition_id),
            "local-test-accuracy": local["accuracy"],
            "local-test-loss": local["loss"],
            "local-test-examples": local["num-examples"],
        }

    def round_seed(self, server_round: int) -> int:
        """A seed unique to (run seed, round, partition): reproducible local randomness."""
        return zlib.crc32(f"{self.cfg.seed}:{server_round}:{self.partition_id}".encode())
