"""What a run trains on: the data split and the model, built from the config.

Server and clients each call these with the same config and get the same
split and the same initial model, without exchanging anything.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from omegaconf import DictConfig

from fedlayer.data import ArrayDataset, load_dataset, make_federated_split
from fedlayer.data.partition import FederatedSplit
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
    """Load ``cfg.dataset`` and split it among ``num_partitions`` clients.

    Cached per process: a simulation actor serves many clients and rounds,
    and splitting imports flwr-datasets and computes partitions.
    """
    data = cfg.dataset
    return _workload(
        data.name,
        None if data.root is None else str(data.root),
        bool(data.download),
        path or (None if data.path is None else str(data.path)),
        data.image_size,
        num_partitions,
        str(data.partition.scheme),
        int(cfg.seed),
        float(data.partition.alpha),
        int(data.partition.classes_per_client),
        float(data.client_test_fraction),
        float(data.central_test_fraction),
    )


@functools.lru_cache(maxsize=4)
def _workload(
    name: str,
    root: str | None,
    download: bool,
    path: str | None,
    image_size: int | None,
    num_partitions: int,
    scheme: str,
    seed: int,
    alpha: float,
    classes_per_partition: int,
    client_test_fraction: float,
    central_test_fraction: float,
) -> Workload:
    pool, official_test = load_dataset(name, root=root, download=download, path=path, image_size=image_size)
    pool_used, split = make_federated_split(
        pool,
        official_test,
        num_partitions=num_partitions,
        scheme=scheme,
        seed=seed,
        alpha=alpha,
        classes_per_partition=classes_per_partition,
        client_test_fraction=client_test_fraction,
        central_test_fraction=central_test_fraction,
    )
    return Workload(pool=pool_used, split=split)


def build_configured_model(cfg: DictConfig, dataset: ArrayDataset) -> LayeredModel:
    """The configured model for a dataset, initialised from ``cfg.seed``."""
    return build_model(
        cfg.model.name,
        input_shape=dataset.input_shape,
        num_classes=dataset.num_classes,
        seed=int(cfg.seed),
    )


def initial_state(cfg: DictConfig, dataset: ArrayDataset) -> State:
    """The initial global model as a numpy state (same on server and clients)."""
    return torch_state_to_numpy(build_configured_model(cfg, dataset).state_dict())
