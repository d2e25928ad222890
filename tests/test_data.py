"""Datasets and federated splits, on the real data bundled with installed packages."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fedlayer.data import (
    DATASETS,
    PARTITION_SCHEMES,
    ArrayDataset,
    load_dataset,
    make_federated_split,
    partition_indices,
    split_train_test,
)


@pytest.fixture(scope="module")
def mnist5k() -> ArrayDataset:
    return load_dataset("mnist5k")[0]


def max_class_share(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean over partitions of the largest single-class fraction."""
    return float(np.mean([np.bincount(labels[p]).max() / len(p) for p in parts]))


@pytest.mark.parametrize(
    ("name", "n", "hw"),
    [("mnist5k", 5000, 28), ("animal10k", 10000, 28), ("digits", 1797, 8)],
)
def test_bundled_datasets_shapes_and_normalisation(name: str, n: int, hw: int) -> None:
    train, test = load_dataset(name)
    assert test is None
    assert train.x.shape == (n, 1, hw, hw) and train.x.dtype == np.float32
    assert train.y.shape == (n,) and train.y.dtype == np.int64
    assert train.num_classes == 10 and set(np.unique(train.y)) == set(range(10))
    assert train.input_shape == (1, hw, hw) and len(train) == n
    assert abs(float(train.x.mean())) < 1e-3 and abs(float(train.x.std()) - 1) < 1e-3
    assert train.x.flags.c_contiguous


def test_loaders_are_cached(mnist5k: ArrayDataset) -> None:
    assert load_dataset("mnist5k")[0] is mnist5k


def test_image_size_pads_28_to_32_with_background(mnist5k: ArrayDataset) -> None:
    padded = load_dataset("mnist5k", image_size=32)[0]
    assert padded.x.shape == (5000, 1, 32, 32)
    background = padded.x[0, 0, 0, 0]
    assert np.all(padded.x[:, :, :2, :] == background) and np.all(padded.x[:, :, :, -2:] == background)
    # The centre holds the original digits (same up to the changed statistics).
    centre = padded.x[:, :, 2:30, 2:30]
    assert np.corrcoef(centre.ravel(), mnist5k.x.ravel())[0, 1] > 0.999


def test_image_size_resizes_when_padding_cannot_be_centred() -> None:
    assert load_dataset("digits", image_size=28)[0].x.shape == (1797, 1, 28, 28)
    assert load_dataset("mnist5k", image_size=16)[0].x.shape == (5000, 1, 16, 16)


def test_subset_copies_selected_examples(mnist5k: ArrayDataset) -> None:
    sub = mnist5k.subset(np.array([3, 4000]))
    assert len(sub) == 2 and sub.num_classes == 10
    np.testing.assert_array_equal(sub.y, mnist5k.y[[3, 4000]])
    np.testing.assert_array_equal(sub.x[1], mnist5k.x[4000])


def test_iid_partitions_are_disjoint_cover_pool_and_mix_classes(mnist5k: ArrayDataset) -> None:
    parts = partition_indices(mnist5k.y, 10, "iid", seed=0)
    joined = np.concatenate(parts)
    assert len(joined) == len(mnist5k) and len(np.unique(joined)) == len(mnist5k)
    assert {len(p) for p in parts} == {500}
    # mnist5k is sorted by label: unshuffled contiguous slices would hold one class each.
    assert all(len(np.unique(mnist5k.y[p])) == 10 for p in parts)
    assert max_class_share(mnist5k.y, parts) < 0.2


def test_dirichlet_small_alpha_is_skewed_and_works_with_20_clients(mnist5k: ArrayDataset) -> None:
    labels = mnist5k.y[:4000]
    iid = partition_indices(labels, 20, "iid", seed=1)
    skewed = partition_indices(labels, 20, "dirichlet", seed=1, alpha=0.1)
    assert len(skewed) == 20 and min(len(p) for p in skewed) >= 2
    assert sum(len(p) for p in skewed) == 4000
    assert max_class_share(labels, skewed) > 2 * max_class_share(labels, iid)


def test_pathological_gives_at_most_k_classes_per_client(mnist5k: ArrayDataset) -> None:
    parts = partition_indices(mnist5k.y[:4000], 50, "pathological", seed=0, classes_per_partition=2)
    assert len(parts) == 50 and all(len(p) > 0 for p in parts)
    assert all(len(np.unique(mnist5k.y[p])) <= 2 for p in parts)
    assert len(np.unique(np.concatenate(parts))) == 4000  # every class is used


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"scheme": "shards"}, "scheme"),
        ({"num_partitions": 0}, "num_partitions"),
        ({"scheme": "dirichlet", "alpha": 0.0}, "alpha"),
        ({"scheme": "pathological", "classes_per_partition": 0}, "classes_per_partition"),
    ],
)
def test_partition_rejects_bad_arguments(mnist5k: ArrayDataset, kwargs: dict, argument: str) -> None:
    args = {"num_partitions": 5, "scheme": "iid", **kwargs}
    with pytest.raises(ValueError, match=argument):
        partition_indices(mnist5k.y, args.pop("num_partitions"), args.pop("scheme"), seed=0, **args)


def test_split_train_test_is_seeded_and_disjoint() -> None:
    train, test = split_train_test(np.arange(100, 150), 0.2, seed=3)
    assert len(test) == 10 and len(train) == 40
    assert set(train).isdisjoint(test) and set(train) | set(test) == set(range(100, 150))
    again = split_train_test(np.arange(100, 150), 0.2, seed=3)
    np.testing.assert_array_equal(test, again[1])
    assert [len(s) for s in split_train_test(np.array([7, 9]), 0.2, seed=0)] == [1, 1]


def split_of(pool: ArrayDataset, scheme: str, seed: int, test: ArrayDataset | None = None):
    return make_federated_split(
        pool, test, num_partitions=10, scheme=scheme, seed=seed, alpha=0.3, classes_per_partition=2
    )


@pytest.mark.parametrize("scheme", PARTITION_SCHEMES)
def test_federated_split_is_deterministic_and_seed_dependent(mnist5k: ArrayDataset, scheme: str) -> None:
    _, first = split_of(mnist5k, scheme, seed=0)
    # A fresh copy of the pool bypasses the memo, so this recomputes from scratch.
    _, second = split_of(mnist5k.subset(np.arange(len(mnist5k))), scheme, seed=0)
    _, other = split_of(mnist5k, scheme, seed=1)
    for a, b in zip(first.client_train + first.client_test, second.client_train + second.client_test, strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(first.client_train, other.client_train, strict=True))


def test_federated_split_holds_out_a_disjoint_stratified_central_test(mnist5k: ArrayDataset) -> None:
    used, split = split_of(mnist5k, "iid", seed=0)
    assert len(used) == 4000 and len(split.central_test) == 1000
    assert np.all(np.bincount(split.central_test.y) == 100)
    # Central test images are not in the pool the clients index into.
    client_rows = {used.x[i].tobytes() for part in split.client_train + split.client_test for i in part}
    assert not client_rows & {row.tobytes() for row in split.central_test.x}
    clients = np.concatenate(split.client_train + split.client_test)
    assert len(np.unique(clients)) == len(clients) == len(used)
    assert all(len(te) > 0 for te in split.client_test)
    assert sum(map(len, split.client_test)) / len(used) == pytest.approx(0.2, abs=0.01)
    assert split_of(mnist5k, "iid", seed=0)[1] is split  # memoised


def test_federated_split_uses_official_test_set_whole(mnist5k: ArrayDataset) -> None:
    official = mnist5k.subset(np.arange(0, 5000, 10))
    used, split = split_of(mnist5k, "iid", seed=0, test=official)
    assert used is mnist5k and split.central_test is official
    assert sum(len(a) + len(b) for a, b in zip(split.client_train, split.client_test)) == 5000


def test_partition_agrees_across_processes(mnist5k: ArrayDataset) -> None:
    """Clients compute their split in separate processes: it must not depend on the process."""
    code = (
        "import json; from fedlayer.data import load_dataset, partition_indices;"
        "y = load_dataset('mnist5k')[0].y;"
        "print(json.dumps([p[:20].tolist() for p in partition_indices(y, 6, 'dirichlet', seed=4, alpha=0.2)]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    here = [p[:20].tolist() for p in partition_indices(mnist5k.y, 6, "dirichlet", seed=4, alpha=0.2)]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == here


@pytest.mark.parametrize("layout", ["nhw", "nhwc", "nchw"])
def test_local_npz(tmp_path, layout: str) -> None:
    raw = np.rint(load_dataset("mnist5k")[0].x[:60:3, 0] * 80 + 60).clip(0, 255).astype(np.uint8)
    labels = np.arange(20) % 4
    x = {"nhw": raw, "nhwc": raw[..., None], "nchw": raw[:, None]}[layout]
    path = tmp_path / f"{layout}.npz"
    np.savez(path, x=x, y=labels)
    train, test = load_dataset("local", path=str(path))
    assert test is None and train.x.shape == (20, 1, 28, 28) and train.num_classes == 4
    np.testing.assert_array_equal(train.y, labels)
    assert abs(float(train.x.mean())) < 1e-3 and abs(float(train.x.std()) - 1) < 1e-3


def test_local_image_folder_matches_npz(tmp_path, mnist5k: ArrayDataset) -> None:
    picks = np.r_[0:3, 500:503, 4500:4503]  # digits 0, 1 and 9
    pixels = np.rint((mnist5k.x[picks, 0] - mnist5k.x.min()) * 60).clip(0, 255).astype(np.uint8)
    folder = tmp_path / "images"
    for i, (img, label) in enumerate(zip(pixels, mnist5k.y[picks], strict=True)):
        (folder / f"digit_{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"digit_{label}" / f"{i}.png")
    train, _ = load_dataset("local", path=str(folder), image_size=32)
    assert train.x.shape == (9, 1, 32, 32) and train.num_classes == 3
    np.testing.assert_array_equal(train.y, [0, 0, 0, 1, 1, 1, 2, 2, 2])  # sorted folder names
    np.savez(tmp_path / "same.npz", x=pixels, y=train.y)
    np.testing.assert_allclose(load_dataset("local", path=str(tmp_path / "same.npz"), image_size=32)[0].x, train.x)


def test_local_rgb_image_folder(tmp_path) -> None:
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(tmp_path / name / f"{i}.jpg")
    train, _ = load_dataset("local", path=str(tmp_path))
    assert train.x.shape == (4, 3, 10, 12) and list(train.y) == [0, 0, 1, 1]


def test_local_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="path"):
        load_dataset("local")
    with pytest.raises(FileNotFoundError):
        load_dataset("local", path=str(tmp_path / "missing.npz"))
    np.savez(tmp_path / "nolabels.npz", x=np.zeros((3, 8, 8)))
    with pytest.raises(ValueError, match="'y'"):
        load_dataset("local", path=str(tmp_path / "nolabels.npz"))
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        load_dataset("local", path=str(tmp_path / "empty"))


@pytest.mark.parametrize("name", ["mnist", "cifar10", "fashion_mnist"])
def test_torchvision_dataset_without_files_needs_explicit_download(tmp_path, name: str) -> None:
    with pytest.raises(FileNotFoundError, match="dataset.download=true"):
        load_dataset(name, root=str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_unknown_dataset_names_the_choices() -> None:
    assert DATASETS == ("mnist5k", "animal10k", "digits", "cifar10", "mnist", "fashion_mnist", "local")
    with pytest.raises(ValueError, match="mnist5k, animal10k"):
        load_dataset("imagenet")
