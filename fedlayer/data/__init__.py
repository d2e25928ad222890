"""Datasets for fedlayer: loading by name and splitting among federated clients."""

from fedlayer.data.partition import (
    PARTITION_SCHEMES,
    FederatedSplit,
    make_federated_split,
    partition_indices,
    split_train_test,
)
from fedlayer.data.registry import DATASETS, load_dataset
from fedlayer.data.types import ArrayDataset

__all__ = [
    "DATASETS",
    "PARTITION_SCHEMES",
    "ArrayDataset",
    "FederatedSplit",
    "load_dataset",
    "make_federated_split",
    "partition_indices",
    "split_train_test",
]
