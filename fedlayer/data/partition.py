"""Splitting a train pool among federated clients with flwr-datasets partitioners.

Every split is a pure function of its arguments (seeded), so server and clients
in separate processes compute the same partition without exchanging it.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import numpy as np

from fedlayer.data.types import ArrayDataset

PARTITION_SCHEMES = ("iid", "dirichlet", "pathological")


def partition_indices(
    labels: np.ndarray,
    num_partitions: int,
    scheme: str,
    *,
    seed: int,
    alpha: float = 0.5,
    classes_per_partition: int = 2,
    min_partition_size: int = 2,
) -> list[np.ndarray]:
    """Indices into ``labels`` for each of ``num_partitions`` partitions (each sorted).

    iid: equal shares of a seeded shuffle. dirichlet: class shares drawn from
    Dir(alpha), resampled by flwr-datasets until every partition holds
    ``min_partition_size`` examples. pathological: ``classes_per_partition``
    classes per partition, the first one assigned round-robin so that all
    classes are used when there are at least as many partitions as classes.
    """
    labels = np.asarray(labels)
    if scheme not in PARTITION_SCHEMES:
        raise ValueError(f"scheme must be one of {', '.join(PARTITION_SCHEMES)}; got {scheme!r}")
    if not 1 <= num_partitions <= len(labels):
        raise ValueError(f"num_partitions must be between 1 and the {len(labels)} examples; got {num_partitions}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0; got {alpha}")
    if classes_per_partition < 1:
        raise ValueError(f"classes_per_partition must be >= 1; got {classes_per_partition}")

    # Imported here: `datasets` and flwr-datasets take seconds to import.
    import datasets
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        PathologicalPartitioner,
    )

    partitioner: IidPartitioner | DirichletPartitioner | PathologicalPartitioner
    if scheme == "iid":
        partitioner = IidPartitioner(num_partitions)
    elif scheme == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions, partition_by="label", alpha=alpha, seed=seed, min_partition_size=min_partition_size
        )
    else:
        partitioner = PathologicalPartitioner(
            num_partitions,
            partition_by="label",
            num_classes_per_partition=classes_per_partition,
            class_assignment_mode="first-deterministic",
            seed=seed,
        )
    # In memory only: no hub access, no cache files. The shuffle matters for iid,
    # which cuts contiguous slices (and the bundled datasets are sorted by label).
    table = datasets.Dataset.from_dict({"idx": np.arange(len(labels)), "label": labels.tolist()})
    partitioner.dataset = table.shuffle(seed=seed)
    with warnings.catch_warnings():
        # Dirichlet warns on every resampling it needs for min_partition_size; expected here.
        warnings.filterwarnings("ignore", message="The specified min_partition_size")
        parts = [partitioner.load_partition(i)["idx"] for i in range(num_partitions)]
    return [np.sort(np.asarray(part, dtype=np.int64)) for part in parts]


def split_train_test(indices: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random (train, test) split of ``indices``, each sorted.

    With a positive fraction and at least two indices, both sides get at least one.
    """
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must be in [0, 1); got {test_fraction}")
    indices = np.asarray(indices, dtype=np.int64)
    n = len(indices)
    n_test = int(round(n * test_fraction))
    if test_fraction > 0 and n >= 2:
        n_test = min(max(n_test, 1), n - 1)
    shuffled = np.random.default_rng(seed).permutation(indices)
    return np.sort(shuffled[n_test:]), np.sort(shuffled[:n_test])


def _stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held-out) indices, holding out ``fraction`` of each class where possible."""
    from sklearn.model_selection import (
        train_test_split,  # imported here: slow to import
    )

    if not 0 < fraction < 1:
        raise ValueError(f"central_test_fraction must be in (0, 1) without an official test set; got {fraction}")
    counts = np.bincount(labels)
    stratify = labels if counts[counts > 0].min() >= 2 else None
    kept, held = train_test_split(np.arange(len(labels)), test_size=fraction, random_state=seed, stratify=stratify)
    return np.sort(kept), np.sort(held)


@dataclass(frozen=True)
class FederatedSplit:
    """The central test set and each client's (train, test) indices into the train pool."""

    central_test: ArrayDataset
    client_train: list[np.ndarray]
    client_test: list[np.ndarray]


@functools.lru_cache(maxsize=8)
def make_federated_split(
    pool: ArrayDataset,
    official_test: ArrayDataset | None,
    *,
    num_partitions: int,
    scheme: str,
    seed: int,
    alpha: float,
    classes_per_partition: int,
    client_test_fraction: float = 0.2,
    central_test_fraction: float = 0.2,
) -> tuple[ArrayDataset, FederatedSplit]:
    """(train pool used, split) for ``num_partitions`` clients.

    Without an official test set, a stratified ``central_test_fraction`` of the
    pool becomes the central test set and only the rest is partitioned. Each
    client's partition is then split into local train and test. Memoised on the
    arguments (datasets by identity; ``load_dataset`` returns cached objects).
    """
    if official_test is None:
        kept, held = _stratified_holdout(pool.y, central_test_fraction, seed)
        train_pool, central_test = pool.subset(kept), pool.subset(held)
    else:
        if official_test.input_shape != pool.input_shape or official_test.num_classes != pool.num_classes:
            raise ValueError(f"official test set {official_test.name} does not match the train pool {pool.name}")
        train_pool, central_test = pool, official_test
    parts = partition_indices(
        train_pool.y,
        num_partitions,
        scheme,
        seed=seed,
        alpha=alpha,
        classes_per_partition=classes_per_partition,
    )
    splits = [split_train_test(part, client_test_fraction, seed + i) for i, part in enumerate(parts)]
    return train_pool, FederatedSplit(
        central_test=central_test,
        client_train=[train for train, _ in splits],
        client_test=[test for _, test in splits],
    )
