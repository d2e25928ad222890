"""Strategies are plain typed constructors: built from keyword arguments alone, no Hydra."""

import inspect

import pytest
from omegaconf import OmegaConf

from fedlayer.config import compose_config
from fedlayer.errors import ConfigError, ParameterError
from fedlayer.layers import torch_state_to_numpy
from fedlayer.methods import METHODS, LayerwiseStrategy
from fedlayer.methods.fedavg import FedAvgStrategy
from fedlayer.methods.fedlama import FedLAMAStrategy
from fedlayer.methods.fedlp import FedLPStrategy
from fedlayer.methods.fll import FLLStrategy
from fedlayer.methods.laq import LAQStrategy
from fedlayer.methods.local import LocalOnlyStrategy
from fedlayer.methods.pfedla import PFedLAStrategy
from fedlayer.models import build_model
from fedlayer.server.builder import BASE_FIELDS

NODES = [11, 12, 13, 14]


def _model(name="cnn"):
    return build_model(name, input_shape=(1, 8, 8), num_classes=10, seed=0)


def _state(model):
    return torch_state_to_numpy(model.state_dict())


def _built():
    cnn, cnn6 = _model(), build_model("cnn6", input_shape=(3, 32, 32), num_classes=10, seed=0)
    base = {"fraction_train": 0.5, "min_train_nodes": 1, "seed": 3}
    return {
        "fedavg": FedAvgStrategy(_state(cnn), **base),
        "fedlama": FedLAMAStrategy(_state(cnn), local_steps=5, phi=4, min_round_to_adjust=0, **base),
        "fedlp": FedLPStrategy(_state(cnn6), model=cnn6, scheme="heterogeneous", p=0.3, layer_p=["head.fc1=0.9"], **base),
        "fll": FLLStrategy(_state(cnn), model=cnn, rounds_per_stage=3, p_drop=0.2, **base),
        "laq": LAQStrategy(_state(cnn), num_clients=4, mode="delta", bits=8, alpha=0.25, **base),
        "local": LocalOnlyStrategy(_state(cnn), **base),
        "pfedla": PFedLAStrategy(_state(cnn), num_clients=4, hn_lr=5.0, k=1, **base),
    }


def test_every_method_is_constructed_from_keyword_arguments_and_plans_a_round(tmp_path):
    built = _built()
    assert set(built) == set(METHODS)
    for name, strategy in built.items():
        assert isinstance(strategy, METHODS[name].strategy)
        strategy.attach_run_dir(tmp_path / name)
        strategy.client_of = {node: i for i, node in enumerate(NODES)}
        messages = strategy.configure_train(1, NODES)
        assert len(messages) == 2, name  # fraction_train 0.5 of 4 nodes
        assert all(m.content["config"]["method"] == strategy.method for m in messages)
    assert built["fedlama"].phi == 4 and built["fedlp"].keep_rate["head.fc1"] == 0.9
    assert len(built["fedlp"].level_heads) == 2 * 2  # weight and bias of the heads of levels 1 and 2


@pytest.mark.parametrize(
    ("cls", "kwargs", "name"),
    [
        (FedLAMAStrategy, {"phi": 0}, "phi"),
        (FedLPStrategy, {"model": _model(), "p": 1.5}, "p"),
        (FedLPStrategy, {"model": _model(), "layer_p": ["head.nope=0.5"]}, "layer_p"),
        (FLLStrategy, {"model": _model(), "p_drop": 1.0}, "p_drop"),
        (LAQStrategy, {"num_clients": 2, "bits": 9}, "bits"),
        (PFedLAStrategy, {"num_clients": 2, "k": 99}, "k"),
        (FedAvgStrategy, {"fraction_train": 0.0}, "fraction_train"),
    ],
)
def test_a_bad_argument_raises_a_value_error_naming_it(cls, kwargs, name):
    with pytest.raises(ParameterError) as err:
        cls(_state(_model()), **kwargs)
    assert err.value.name == name and isinstance(err.value, ValueError)


def test_the_builder_names_the_config_field(tmp_path):
    from fedlayer.config import compose_config
    from fedlayer.server.builder import build_strategy
    from fedlayer.workload import load_workload

    def build(*overrides):
        cfg = compose_config(["dataset=digits", *overrides])
        return build_strategy(cfg, load_workload(cfg, int(cfg.federation.num_clients)))

    assert isinstance(build("strategy=fedlama", "strategy.phi=3"), FedLAMAStrategy)
    with pytest.raises(ConfigError, match="'strategy.phi'"):
        build("strategy=fedlama", "strategy.phi=0")
    with pytest.raises(ConfigError, match="'model.name'"):
        build("strategy=laq", "model=cnn6", "dataset.image_size=32")
    with pytest.raises(ConfigError, match="'strategy.bogus': not a parameter of FedLAMAStrategy"):
        build("strategy=fedlama", "+strategy.bogus=1")


def _keyword_defaults(cls) -> dict:
    return {n: p.default for n, p in inspect.signature(cls).parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def test_every_strategy_yaml_sets_exactly_its_constructors_defaults():
    """One value for each default: ``conf/strategy/<name>.yaml`` (with ``_common.yaml``, the base
    strategy's ``server_momentum``) holds every argument of the constructor that the rest of the
    run does not fill (``BASE_FIELDS``), with the constructor's default, and nothing else."""
    base = _keyword_defaults(LayerwiseStrategy)
    for name, method in METHODS.items():
        yaml = OmegaConf.to_container(compose_config([f"strategy={name}"]).strategy, resolve=True)
        assert yaml.pop("name") == name
        own = {k: v for k, v in _keyword_defaults(method.strategy).items() if k not in base and k not in BASE_FIELDS}
        expected = {**{k: _plain(v) for k, v in own.items()}, "server_momentum": base["server_momentum"]}
        assert {k: (type(v), v) for k, v in yaml.items()} == {k: (type(v), v) for k, v in expected.items()}, name


def test_a_method_logs_its_own_summary_first_then_the_base_strategys(tmp_path):
    """As Flower's strategies do (FedAvgM, FedTrimmedAvg): the subclass's settings, then its parent's."""
    import logging

    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("flwr")
    logger.addHandler(handler)
    try:
        for name, strategy in _built().items():
            strategy.attach_run_dir(tmp_path / name)
            lines.clear()
            strategy.summary()
            base = next(i for i, line in enumerate(lines) if f"{type(strategy).__name__} over" in line)
            own = type(strategy).summary is not LayerwiseStrategy.summary
            assert base == (1 if own else 0), (name, lines)
    finally:
        logger.removeHandler(handler)
