"""Layers: grouping, selection, merging and ArrayRecord round trips."""

import numpy as np
import pytest
import torch

from fedlayer.layers import (
    ModelLayers,
    copy_state,
    from_arrayrecord,
    merge,
    numpy_to_torch_state,
    select,
    states_equal,
    to_arrayrecord,
    torch_state_to_numpy,
)
from tests.conftest import small_state


def test_groups_keys_by_module_with_batchnorm_statistics():
    layers = ModelLayers.from_state(small_state())
    assert layers.names == ["blocks.0.conv", "blocks.0.bn", "head.fc"]
    bn = layers["blocks.0.bn"]
    assert set(bn.keys) == {
        "blocks.0.bn.weight",
        "blocks.0.bn.bias",
        "blocks.0.bn.running_mean",
        "blocks.0.bn.running_var",
        "blocks.0.bn.num_batches_tracked",
    }
    assert layers["blocks.0.conv"].numel == 4 * 9 + 4
    assert layers.numel() == 40 + 4 * 4 + 1 + 48 + 3
    assert layers.layer_of("head.fc.bias") == "head.fc"


def test_torch_module_grouping_matches_modules():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.Flatten(), torch.nn.Linear(8, 2))
    layers = ModelLayers.from_state(torch_state_to_numpy(model.state_dict()))
    assert layers.names == ["0", "1", "3"]
    assert len(layers["1"].keys) == 5


def test_select_and_merge_only_touch_named_layers():
    layers = ModelLayers.from_state(small_state())
    base, other = small_state(0), small_state(1)
    part = select(other, layers, ["head.fc"])
    assert set(part) == {"head.fc.weight", "head.fc.bias"}
    merged = merge(base, part)
    assert np.array_equal(merged["head.fc.weight"], other["head.fc.weight"])
    assert np.array_equal(merged["blocks.0.conv.weight"], base["blocks.0.conv.weight"])
    assert states_equal(base, small_state(0))  # merge does not mutate its input
    with pytest.raises(KeyError):
        merge(base, {"nope": np.zeros(1)})
    with pytest.raises(KeyError):
        select(base, layers, ["missing"])


def test_arrayrecord_and_torch_round_trips_are_exact():
    state = small_state(3)
    assert states_equal(from_arrayrecord(to_arrayrecord(state)), state)
    assert states_equal(torch_state_to_numpy(numpy_to_torch_state(state)), state)
    copied = copy_state(state)
    copied["head.fc.bias"][0] += 1
    assert not states_equal(copied, state)
