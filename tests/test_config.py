"""Configuration: one Hydra tree, run-config mapping, errors that name the field."""

import subprocess

import pytest
import torch

from fedlayer.config import check_group_choices, compose_config, resolve_resume, run_config_to_overrides
from fedlayer.device import resolve_device
from fedlayer.errors import ConfigError


def test_defaults_compose_and_groups_switch():
    cfg = compose_config([])
    assert (cfg.strategy.name, cfg.dataset.name, cfg.model.name) == ("fedavg", "mnist5k", "cnn")
    cfg = compose_config(["dataset=animal10k", "model=resnet20", "dataset.partition.scheme=dirichlet"])
    assert (cfg.dataset.name, cfg.model.name, cfg.dataset.partition.scheme) == ("animal10k", "resnet20", "dirichlet")


def test_flower_run_config_maps_onto_overrides():
    overrides = run_config_to_overrides(
        {"strategy": "fedavg", "dataset": "animal10k", "model": "", "overrides": "federation.rounds=5 train.lr=0.1"}
    )
    assert overrides == ["strategy=fedavg", "dataset=animal10k", "federation.rounds=5", "train.lr=0.1"]
    cfg = compose_config(overrides)
    assert cfg.federation.rounds == 5 and cfg.train.lr == 0.1 and cfg.model.name == "cnn"


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("federation.rounds=0", "federation.rounds"),
        ("train.lr=-1", "train.lr"),
        ("train.optimizer=rmsprop", "train.optimizer"),
        ("dataset.partition.scheme=shards", "dataset.partition.scheme"),
        ("dataset.partition.alpha=0", "dataset.partition.alpha"),
        ("federation.fraction_train=1.5", "federation.fraction_train"),
        ("device=tpu", "device"),
        ("strategy=nope", "strategy"),
        ("dataset=nope", "dataset"),
        ("federation.no_such_key=1", "federation.no_such_key"),
    ],
)
def test_bad_values_fail_naming_the_field(override, field):
    with pytest.raises(ConfigError) as info:
        compose_config([override])
    assert info.value.field == field
    assert f"'{field}'" in str(info.value)


def test_resume_needs_a_run_directory(tmp_path):
    with pytest.raises(ConfigError, match="resume"):
        resolve_resume(compose_config([f"resume={tmp_path}"]))


def test_device_falls_back_to_cpu_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto").type == "cpu"
    assert resolve_device("cuda:1").type == "cpu"
    assert "not available" in caplog.text
    with pytest.raises(ValueError):
        resolve_device("tpu")


def test_fedlayer_sim_refuses_an_unknown_option_in_one_line():
    """Not Hydra's search-path dump: fedlayer's one-line error, exit 2, before anything runs."""
    done = subprocess.run(["fedlayer-sim", "strategy=fedavgg", "federation.rounds=1"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [
        "fedlayer-sim: error: config field 'strategy': unknown option 'fedavgg'; choose from "
        "['fedavg', 'fedlama', 'fedlp', 'fll', 'laq', 'local', 'pfedla']"
    ]


def test_a_sweep_checks_each_option_and_leaves_sweep_functions_to_hydra():
    check_group_choices(["dataset=digits,mnist5k", "strategy=glob(fed*)", "federation.rounds=1,2"], sweeps=True)
    with pytest.raises(ConfigError, match="unknown option 'mnist5kk'"):
        check_group_choices(["dataset=digits,mnist5kk"], sweeps=True)
    with pytest.raises(ConfigError, match="unknown option 'digits,mnist5k'"):
        check_group_choices(["dataset=digits,mnist5k"])
