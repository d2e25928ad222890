"""A ClientApp call's runtime, from the run's config and this node's node config.

A deployed ClientApp process may live for one message only (Flower starts a
fresh ``flwr-clientapp`` per message), so everything here is cheap: the
config is read without Hydra and cached per process, and the data split and
model are cached per process by ``fedlayer.workload``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from flwr.app import Context
from omegaconf import DictConfig

from fedlayer.client.state import NodeStateFiles
from fedlayer.config import load_config, run_config_to_overrides
from fedlayer.device import resolve_device
from fedlayer.methods.client import ClientRuntime
from fedlayer.protocol import PARTITION_ID


@functools.lru_cache(maxsize=4)
def _config_for(overrides: tuple[str, ...]) -> DictConfig:
    return load_config(overrides)


def client_config(context: Context, cfg: DictConfig | None) -> DictConfig:
    """``cfg`` when the app was given one (simulation), else the run config's tree."""
    if cfg is not None:
        return cfg
    return _config_for(tuple(run_config_to_overrides(context.run_config)))


def client_runtime(context: Context, cfg: DictConfig, files: NodeStateFiles | None = None) -> ClientRuntime:
    """The runtime of this node for the run configured by ``cfg``.

    Node config keys: ``partition-id`` and ``num-partitions`` (set by the
    simulation engine; given with ``--node-config`` in deployment), optional
    ``data-path`` (the device's own data) and ``device``. With the node's
    state ``files``, its data split is kept in their folder.
    """
    node = context.node_config
    device = resolve_device(str(node.get("device", cfg.device)))
    if device.type == "cpu":
        torch.set_num_threads(1)
    return ClientRuntime(
        cfg=cfg,
        partition_id=int(node.get(PARTITION_ID, 0)),
        num_partitions=int(node.get("num-partitions", cfg.federation.num_clients)),
        data_path=str(node["data-path"]) if "data-path" in node else None,
        device=device,
        data_cache=None if files is None else files.root,
    )


def state_files(context: Context, cfg: DictConfig) -> NodeStateFiles | None:
    """This node's saved per-round state, when a state folder is configured."""
    folder = str(context.node_config.get("state-dir", cfg.client_state_dir or "")) or None
    if folder is None:
        return None
    partition = int(context.node_config.get(PARTITION_ID, 0))
    return NodeStateFiles(Path(folder) / f"partition-{partition:05d}")
