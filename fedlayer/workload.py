"""What a run trains on: the data split and the model, built from the config.

Server and clients each call these with the same config and get the same
split and the same initial model, without exchanging anything. Loading and
splitting are memoised per process (``load_dataset``, ``make_federated_split``);
``client_data`` can also keep a client's split in a folder, so that a fresh
process (a deployed ClientApp serves one message) skips the split and the
libraries it imports (flwr-datasets, scikit-learn).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from fedlayer.data import ArrayDataset, load_dataset, make_federated_split
from fedlayer.data.partition import FederatedSplit
from fedlayer.files import atomic_write
from fedlayer.layers import State, torch_state_to_numpy
from fedlayer.models import LayeredModel, build_model


@dataclass(frozen=True)
class Workload:
    """A dataset split among ``num_partitions`` clients, plus a central test set."""

    pool: ArrayDataset
    split: FederatedSplit

    @property
    def central_test(self) -> ArrayDataset:
        return self.split.central_test

    def client_data(self, partition_id: int) -> tuple[ArrayDataset, ArrayDataset]:
        """(train, test) of one client."""
        if not 0 <= partition_id < len(self.split.client_train):
            raise ValueError(
                f"partition-id {partition_id} outside 0..{len(self.split.client_train) - 1}"
            )
        return (
            self.pool.subset(self.split.client_train[partition_id]),
            self.pool.subset(self.split.client_test[partition_id]),
        )


def load_workload(cfg: DictConfig, num_partitions: int, path: str | None = None) -> Workload:
    """Load ``cfg.dataset`` and split it among ``num_partitions`` clients."""
    data = cfg.dataset
    pool, official_test = load_dataset(
        data.name,
        root=data.root,
        download=bool(data.download),
        path=path or data.path,
        image_size=data.image_size,
    )
    pool_used, split = make_federated_split(
        pool,
        official_test,
        num_partitions=num_partitions,
        scheme=data.partition.scheme,
        seed=int(cfg.seed),
        alpha=float(data.partition.alpha),
        classes_per_partition=int(data.partition.classes_per_client),
        client_test_fraction=float(data.client_test_fraction),
        central_test_fraction=float(data.central_test_fraction),
    )
    return Workload(pool=pool_used, split=split)


def client_data(
    cfg: DictConfig, partition_id: int, num_partitions: int, path: str | None = None, cache: Path | None = None
) -> tuple[ArrayDataset, ArrayDataset]:
    """(train, test) of one client: its partition, or all of its own data at ``path``.

    With ``cache`` (a folder of this node), the two sets are kept there in a
    file named by everything they depend on, and read back instead of split again.
    """
    key = json.dumps([OmegaConf.to_container(cfg.dataset, resolve=True), int(cfg.seed), partition_id, num_partitions, path])
    file = None if cache is None else cache / f"data-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
    if file is not None and file.exists():
        with np.load(file) as saved:
            num_classes, name = int(saved["num_classes"]), str(saved["name"])
            return tuple(ArrayDataset(saved[f"{s}_x"], saved[f"{s}_y"], num_classes, name) for s in ("train", "test"))  # type: ignore[return-value]
    if path is not None:
        train, test = load_workload(cfg, 1, path=path).client_data(0)
    else:
        train, test = load_workload(cfg, num_partitions).client_data(partition_id)
    if file is not None:
        buffer = io.BytesIO()
        np.savez(buffer, train_x=train.x, train_y=train.y, test_x=test.x, test_y=test.y,
                 num_classes=train.num_classes, name=train.name)
        file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(file, buffer.getvalue())
    return train, test


def build_configured_model(cfg: DictConfig, dataset: ArrayDataset) -> LayeredModel:
    """The configured model for a dataset, initialised from ``cfg.seed``.

    A copy of one model built per process and configuration: a client call
    needs a fresh model more than once, and building one initialises every
    tensor at random and runs a dry forward pass.
    """
    return copy.deepcopy(_initial_model(str(cfg.model.name), dataset.input_shape, dataset.num_classes, int(cfg.seed)))


@functools.lru_cache(maxsize=4)
def _initial_model(name: str, input_shape: tuple[int, int, int], num_classes: int, seed: int) -> LayeredModel:
    return build_model(name, input_shape=input_shape, num_classes=num_classes, seed=seed)


def initial_state(cfg: DictConfig, dataset: ArrayDataset) -> State:
    """The initial global model as a numpy state (same on server and clients)."""
    return torch_state_to_numpy(_initial_model(str(cfg.model.name), dataset.input_shape, dataset.num_classes, int(cfg.seed)).state_dict())
