"""Tests for fedlayer.models: shapes, parameter counts, seeding, the block/head contract."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedlayer.models import MODELS, LayeredModel, build_model

# A right-sized input for every model: (input_shape, num_classes).
CASES: dict[str, tuple[tuple[int, int, int], int]] = {
    "cnn": ((1, 28, 28), 10),
    "cnn6": ((3, 32, 32), 10),
    "resnet20": ((3, 32, 32), 10),
    "resnet56": ((1, 28, 28), 10),
    "linear": ((1, 8, 8), 10),
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def make(name: str, seed: int | None = 0) -> LayeredModel:
    input_shape, num_classes = CASES[name]
    return build_model(name, input_shape=input_shape, num_classes=num_classes, seed=seed)


def batch(model: LayeredModel, size: int = 4) -> torch.Tensor:
    return torch.randn(size, *model.input_shape, generator=torch.Generator().manual_seed(1))


def test_every_model_has_a_case() -> None:
    assert set(CASES) == set(MODELS)


@pytest.mark.parametrize("name", MODELS)
def test_output_shape(name: str) -> None:
    model = make(name)
    assert model(batch(model)).shape == (4, model.num_classes)


@pytest.mark.parametrize("name", MODELS)
def test_head_receives_flattened_features(name: str) -> None:
    model = make(name).eval()
    x = batch(model)
    features = model.forward_features(x, len(model.blocks))
    torch.testing.assert_close(model(x), model.head(torch.flatten(features, 1)))


@pytest.mark.parametrize("name", MODELS)
def test_block_output_shape_matches_forward_features(name: str) -> None:
    model = make(name)
    x = batch(model, size=2)
    for upto in range(len(model.blocks) + 1):
        assert model.block_output_shape(upto) == tuple(model.forward_features(x, upto).shape[1:])
    assert model.block_output_shape(0) == model.input_shape


def test_block_output_shape_leaves_state_and_mode_alone() -> None:
    model = make("resnet20")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.blocks[1].eval()
    model.block_output_shape(len(model.blocks))
    assert model.training and not model.blocks[1].training and model.blocks[2].training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_forward_features_rejects_out_of_range() -> None:
    model = make("cnn")
    with pytest.raises(ValueError):
        model.forward_features(batch(model), 3)


def test_cnn_parameter_count_matches_fedavg_paper() -> None:
    assert n_params(make("cnn")) == 1_663_370


@pytest.mark.parametrize("side", [8, 28, 32])
def test_cnn_works_for_sides_divisible_by_4(side: int) -> None:
    model = build_model("cnn", input_shape=(3, side, side), num_classes=10)
    assert model.block_output_shape(2) == (64, side // 4, side // 4)
    assert model(torch.zeros(2, 3, side, side)).shape == (2, 10)


def test_cnn6_layout() -> None:
    model = make("cnn6")
    assert len(model.blocks) == 3
    assert model.head.fc1.in_features == 2048
    assert model.block_output_shape(3) == (128, 4, 4)
    convs = [m for m in model.blocks.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in model.blocks.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == 6 and len(bns) == 6


def test_resnet20_parameter_count() -> None:
    assert 260_000 <= n_params(make("resnet20")) <= 280_000


def test_resnet20_blocks_and_identity_compatibility() -> None:
    model = make("resnet20")
    assert len(model.blocks) == 10
    compatible = [block.is_identity_compatible for block in model.blocks]
    # Stem changes channels; blocks 4 and 7 open stages 2 and 3 (stride 2, more channels).
    assert compatible == [False, True, True, True, False, True, True, False, True, True]
    x = batch(model, size=2)
    for index, block in enumerate(model.blocks):
        if block.is_identity_compatible:
            features = model.forward_features(x, index)
            assert block(features).shape == features.shape


def test_resnet56_has_nine_blocks_per_stage_and_depth_is_checked() -> None:
    model = make("resnet56")
    assert len(model.blocks) == 28  # stem + 3 x 9
    assert 840_000 <= n_params(model) <= 870_000  # He et al.: 0.85M
    compatible = [index for index, block in enumerate(model.blocks) if not block.is_identity_compatible]
    assert compatible == [0, 10, 19]  # the stem and the two downsampling blocks
    from fedlayer.models.resnet import CifarResNet

    with pytest.raises(ValueError, match="6n"):
        CifarResNet((1, 28, 28), 10, depth=21)


@pytest.mark.parametrize("input_shape", [(1, 28, 28), (3, 28, 28), (1, 32, 32)])
def test_resnet20_other_inputs(input_shape: tuple[int, int, int]) -> None:
    model = build_model("resnet20", input_shape=input_shape, num_classes=7)
    assert model(torch.zeros(2, *input_shape)).shape == (2, 7)


def test_non_resnet_blocks_are_not_identity_compatible() -> None:
    for name in ("cnn", "cnn6"):
        assert not any(block.is_identity_compatible for block in make(name).blocks)


def test_state_dict_keys_are_readable() -> None:
    assert {"blocks.0.conv.weight", "head.fc1.weight", "head.fc2.bias"} <= set(
        make("cnn").state_dict()
    )
    assert {"blocks.2.conv2.weight", "blocks.2.bn2.running_mean", "head.fc1.weight"} <= set(
        make("cnn6").state_dict()
    )
    resnet_keys = set(make("resnet20").state_dict())
    assert {
        "blocks.0.conv.weight",
        "blocks.0.bn.running_var",
        "blocks.4.shortcut.conv.weight",
        "blocks.4.shortcut.bn.running_mean",
        "head.fc.weight",
    } <= resnet_keys
    assert set(make("linear").state_dict()) == {"head.fc.weight", "head.fc.bias"}


def test_linear_is_softmax_regression() -> None:
    model = make("linear")
    assert len(model.blocks) == 0
    assert n_params(model) == 8 * 8 * 10 + 10


@pytest.mark.parametrize("name", MODELS)
def test_seed_determines_initialisation(name: str) -> None:
    a, b, c = make(name, seed=7).state_dict(), make(name, seed=7).state_dict(), make(name, seed=8)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], v) for k, v in c.state_dict().items())


def test_seed_does_not_disturb_global_rng() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    make("cnn", seed=5)
    torch.testing.assert_close(torch.rand(3), expected)


def test_unknown_name_lists_models() -> None:
    with pytest.raises(ValueError, match="resnet20"):
        build_model("vgg", input_shape=(3, 32, 32), num_classes=10)


@pytest.mark.parametrize(
    ("name", "input_shape", "num_classes", "match"),
    [
        ("cnn6", (3, 8, 8), 10, "32x32"),
        ("cnn", (1, 30, 30), 10, "divisible by 4"),
        ("cnn", (1, 28), 10, r"\(C, H, W\)"),
        ("resnet20", (3, 0, 32), 10, "positive"),
        ("linear", (1, 8, 8), 0, "num_classes"),
    ],
)
def test_bad_shapes_raise(
    name: str, input_shape: tuple[int, ...], num_classes: int, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        build_model(name, input_shape=input_shape, num_classes=num_classes)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", MODELS)
def test_one_sgd_step_reduces_loss(name: str) -> None:
    model = make(name)
    x = batch(model, size=8)
    y = torch.arange(8) % model.num_classes
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = nn.CrossEntropyLoss()
    before = loss_fn(model(x), y)
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = loss_fn(model(x), y)
    assert after.item() < before.item()
