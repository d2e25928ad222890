"""A ClientApp call's runtime, from the run's config and this node's node config.

A deployed ClientApp process may live for one message only (Flower starts a
fresh ``flwr-clientapp`` per message), so everything here is cheap: the
config is read without Hydra and cached per process, and the data split and
model are cached per process by ``fedlayer.workload``. A warm worker also
keeps each run's model, on its device, between messages (``kept``).
"""

from __future__ import annotations

import functools
import os
import socket
import sys
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, RecordDict
from omegaconf import DictConfig

from fedlayer.client.state import NodeStateFiles
from fedlayer.config import load_config, run_config_to_overrides
from fedlayer.device import resolve_device
from fedlayer.files import atomic_write, keep_newest
from fedlayer.methods.client_half import ClientRuntime
from fedlayer.models.kept import KeptModel
from fedlayer.wire.records import CLIENT_ID, CONFIG, NO_PARTITION, PARTITION_ID


#: A state folder's run folders are ``run-<run key>``; the ``KEEP_RUNS`` most recently used stay.
RUN_FOLDER = "run-"
KEEP_RUNS = 4


@functools.lru_cache(maxsize=4)
def _config_for(overrides: tuple[str, ...]) -> DictConfig:
    return load_config(overrides)


def client_config(context: Context, cfg: DictConfig | None) -> DictConfig:
    """``cfg`` when the app was given one (simulation), else the run config's tree."""
    if cfg is not None:
        return cfg
    return _config_for(tuple(run_config_to_overrides(context.run_config)))


def node_client_id(context: Context, content: RecordDict | None = None) -> int:
    """This node's client id: its ``partition-id``, else the id the server assigned it.

    The assigned id comes in every message (``client-id``) and is kept in the
    node's own ``state-dir`` (node config), so the node answers the identity
    query with it after a restart; ``NO_PARTITION`` while it has none.
    """
    node = context.node_config
    if PARTITION_ID in node:
        return int(node[PARTITION_ID])
    config = content.config_records.get(CONFIG) if content is not None else None
    stored = _assigned_id_file(context)
    if config is not None and CLIENT_ID in config:
        client = int(config[CLIENT_ID])
        if stored is not None and _read_id(stored) != client:
            stored.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(stored, str(client).encode())
        return client
    return _read_id(stored) if stored is not None else NO_PARTITION


def _assigned_id_file(context: Context) -> Path | None:
    """Where a node without a partition id keeps its assigned client id (its own ``state-dir`` only)."""
    folder = context.node_config.get("state-dir")
    return Path(str(folder)) / "client-id" if folder else None


def _read_id(path: Path) -> int:
    return int(path.read_text()) if path.exists() else NO_PARTITION


def client_runtime(
    context: Context, cfg: DictConfig, client_id: int, data_cache: Path | None = None, kept: KeptModel | None = None
) -> ClientRuntime:
    """The runtime of client ``client_id`` (see ``node_client_id``) for the run configured by ``cfg``.

    Node config keys: ``partition-id`` and ``num-partitions`` (set by the
    simulation engine; given with ``--node-config`` in deployment), optional
    ``data-path`` (the device's own data) and ``device``. With a
    ``data_cache`` folder (``node_folder``), its data split is kept there;
    with ``kept`` (a warm worker's session), the model is kept there.
    """
    node = context.node_config
    if PARTITION_ID not in node and "data-path" not in node:
        raise ValueError("this node has neither a partition-id nor a data-path in its node config")
    if client_id == NO_PARTITION:
        raise ValueError("this node has no partition-id and the server has not assigned it a client id")
    device = resolve_device(str(node.get("device", cfg.device)))
    if device.type == "cpu":
        torch.set_num_threads(1)
    return ClientRuntime(
        cfg=cfg,
        partition_id=client_id,
        num_partitions=int(node.get("num-partitions", cfg.federation.num_clients)),
        data_path=str(node["data-path"]) if "data-path" in node else None,
        device=device,
        data_cache=data_cache,
        kept=kept,
    )


def node_folder(context: Context, cfg: DictConfig, client_id: int) -> Path | None:
    """This client's folder in the node's state folder, shared by every run: its data split cache.

    ``<folder>/partition-NNNNN`` for a node with a partition id, else
    ``<folder>/client-NNNNN`` by its assigned client id; None without a state
    folder. The cached split is named by everything it depends on (dataset
    config, seed, partition), so runs may share it.
    """
    folder = str(context.node_config.get("state-dir", cfg.client_state_dir or "")) or None
    if folder is None or client_id == NO_PARTITION:
        return None
    kind = "partition" if PARTITION_ID in context.node_config else "client"
    return Path(folder) / f"{kind}-{client_id:05d}"


def state_files(context: Context, cfg: DictConfig, client_id: int, run_key: str | None) -> NodeStateFiles | None:
    """This node's saved per-round state in run ``run_key`` (``wire.records.RUN_KEY``), with a state folder.

    ``<folder>/run-<key>/<node_folder's name>``: two runs on one device never
    see each other's round state, while ``resume=`` (same key) finds its own.
    None without a state folder or a key. Only the ``KEEP_RUNS`` most recently
    used run folders stay; older ones are deleted when a new run starts here.
    """
    node = node_folder(context, cfg, client_id)
    if node is None or run_key is None:
        return None
    run = node.parent / f"{RUN_FOLDER}{run_key}"
    if run.exists():
        os.utime(run)  # in use: newest
    else:
        run.mkdir(parents=True, exist_ok=True)
        runs = sorted(node.parent.glob(f"{RUN_FOLDER}*"), key=_modified)
        keep_newest([path for path in runs if path != run] + [run], KEEP_RUNS)
    return NodeStateFiles(run / node.name)


def _modified(path: Path) -> tuple[float, str]:
    """When a run folder was last used (then its name, for equal times)."""
    try:
        return path.stat().st_mtime, path.name
    except FileNotFoundError:  # pruned by another client of this node meanwhile
        return 0.0, path.name


def host_record(context: Context) -> ConfigRecord:
    """Where this call runs: the node config's ``host`` (else the hostname), and the Ray node in simulation."""
    where = {"hostname": str(context.node_config.get("host", socket.gethostname()))}
    ray = sys.modules.get("ray")  # imported by Flower's simulation engine only; never imported here
    if ray is not None and ray.is_initialized():
        where["ray-node-id"] = ray.get_runtime_context().get_node_id()
    return ConfigRecord(where)
