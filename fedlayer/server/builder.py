"""The one place the configuration tree becomes a strategy.

Strategies have plain typed constructors that raise ``ParameterError`` (a
``ValueError``) naming the argument. The builder fills each keyword argument
of the configured strategy from ``strategy.<name>`` (or, for what a strategy
needs from the rest of the run, from the federation, the seed and the
model), and turns a ``ParameterError`` into a ``ConfigError`` naming the
configuration field.
"""

from __future__ import annotations

import inspect
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fedlayer.codec.options import CodecOptions
from fedlayer.errors import ConfigError, ParameterError
from fedlayer.methods import METHODS, LayerwiseStrategy
from fedlayer.models import LayeredModel
from fedlayer.privacy import Privacy
from fedlayer.privacy.settings import refusal
from fedlayer.workload import Workload, build_configured_model, initial_state

#: ``LayerwiseStrategy`` arguments every strategy takes.
BASE_ARGUMENTS = (
    "fraction_train", "min_train_nodes", "fraction_evaluate", "seed",
    "aggregation_rule", "trim", "norm_factor", "up_bits", "down_bits", "codec_options", "state_memory_mb", "privacy",
    "server_momentum",
)
#: Arguments filled from outside ``strategy.*``, and the field each one names in errors.
BASE_FIELDS = {
    "fraction_train": "federation.fraction_train",
    "min_train_nodes": "federation.min_train_nodes",
    "fraction_evaluate": "federation.fraction_evaluate",
    "seed": "seed",
    "aggregation_rule": "aggregation.rule",
    "trim": "aggregation.trim",
    "norm_factor": "aggregation.norm_factor",
    "up_bits": "codec.up_bits",
    "down_bits": "codec.down_bits",
    "codec_options": "codec",
    "state_memory_mb": "server_state.memory_mb",
    "privacy": "privacy.mode",
    "num_clients": "federation.num_clients",
    "local_steps": "train.local_steps",
    "model": "model.name",
    "initial_state": "model.name",
}


def strategy_class(cfg: DictConfig) -> type[LayerwiseStrategy]:
    """The class of the configured strategy; ``ConfigError`` for an unknown name."""
    name = cfg.strategy.name
    if name not in METHODS:
        raise ConfigError("strategy.name", f"unknown strategy {name!r}; choose from {sorted(METHODS)}")
    return METHODS[name].strategy


def strategy_kwargs(cfg: DictConfig, model: LayeredModel) -> dict[str, Any]:
    """Keyword arguments of the configured strategy's constructor, from the tree."""
    federation = cfg.federation
    run_values: dict[str, Any] = {
        "fraction_train": float(federation.fraction_train),
        "min_train_nodes": int(federation.min_train_nodes),
        "fraction_evaluate": float(federation.fraction_evaluate),
        "seed": int(cfg.seed),
        "aggregation_rule": cfg.aggregation.rule,
        "trim": cfg.aggregation.trim,
        "norm_factor": cfg.aggregation.norm_factor if cfg.aggregation.norm_guard else 0.0,
        "up_bits": cfg.codec.up_bits,
        "down_bits": cfg.codec.down_bits,
        "codec_options": CodecOptions.from_config(cfg.codec),
        "state_memory_mb": cfg.server_state.memory_mb,
        "privacy": Privacy.from_config(cfg.get("privacy")),
        "server_momentum": cfg.strategy.get("server_momentum", 0.0),  # strategy/_common.yaml (absent from older runs)
        "num_clients": int(federation.num_clients),
        "local_steps": int(cfg.train.local_steps),
        "model": model,
    }
    strategy = OmegaConf.to_container(cfg.strategy, resolve=True)
    assert isinstance(strategy, dict)
    cls = strategy_class(cfg)
    parameters = [n for n, p in inspect.signature(cls).parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(strategy) - set(parameters) - {"name", "server_momentum"})
    if unknown:
        raise ConfigError(f"strategy.{unknown[0]}", f"not a parameter of {cls.__name__} (it takes {parameters})")
    elsewhere = sorted(set(strategy) & set(run_values) - {"server_momentum"})
    if elsewhere:  # one source for each value: what the rest of the run defines is not a strategy setting
        raise ConfigError(f"strategy.{elsewhere[0]}", f"is set by {BASE_FIELDS[elsewhere[0]]}, not by the strategy")
    kwargs = {name: run_values[name] for name in BASE_ARGUMENTS}
    for name in parameters:
        if name in strategy:
            kwargs[name] = strategy[name]
        elif name in run_values:
            kwargs[name] = run_values[name]
    return kwargs


def build_strategy(cfg: DictConfig, workload: Workload) -> LayerwiseStrategy:
    """The configured strategy, starting from the configured initial model."""
    cls = strategy_class(cfg)
    refuse_private_combination(cfg)
    try:
        model = build_configured_model(cfg, workload.pool)
    except ValueError as err:  # a model that does not fit the data (input size, classes)
        raise ConfigError("model.name", str(err)) from None
    try:
        return cls(initial_state(cfg, workload.pool), **strategy_kwargs(cfg, model))
    except ParameterError as err:
        field = BASE_FIELDS.get(err.name, f"strategy.{err.name}")
        raise ConfigError(field, err.problem) from None


def refuse_private_combination(cfg: DictConfig) -> None:
    """``ConfigError`` naming the field and the reason when the configured method cannot be
    private as built (``fedlayer.privacy.settings.refusal``; docs/privacy.md)."""
    privacy = Privacy.from_config(cfg.get("privacy"))
    settings = {"aggregation_rule": cfg.aggregation.rule, **OmegaConf.to_container(cfg.strategy, resolve=True)}
    problem = refusal(privacy, str(cfg.strategy.name), settings)
    if problem is not None:
        field, reason = problem
        raise ConfigError(field, f"privacy.mode={privacy.mode} cannot be used with it: {reason}")
