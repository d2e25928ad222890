"""fedlayer's strategies: one module per method, each a Flower Strategy."""

from __future__ import annotations

from omegaconf import DictConfig

from fedlayer.layers import State
from fedlayer.strategies.base import LayerwiseStrategy, NodePlan
from fedlayer.strategies.fedavg import FedAvgStrategy
from fedlayer.strategies.fedlp import FedLPStrategy
from fedlayer.strategies.fll import FLLStrategy
from fedlayer.strategies.laq import LAQStrategy
from fedlayer.strategies.local_only import LocalOnlyStrategy
from fedlayer.strategies.pfedla import PFedLAStrategy
from fedlayer.strategies.fedlama import FedLAMAStrategy

#: Strategy name (``strategy.name`` in the config) -> class.
STRATEGIES: dict[str, type[LayerwiseStrategy]] = {
    "fedavg": FedAvgStrategy,
    "fedlp": FedLPStrategy,
    "fll": FLLStrategy,
    "laq": LAQStrategy,
    "local": LocalOnlyStrategy,
    "pfedla": PFedLAStrategy,
    "fedlama": FedLAMAStrategy,
}


def validate_strategy_config(cfg: DictConfig) -> None:
    """Check the strategy section; the strategy class checks its own fields."""
    from fedlayer.config import ConfigError

    name = cfg.strategy.name
    if name not in STRATEGIES:
        raise ConfigError("strategy.name", f"unknown strategy {name!r}; choose from {sorted(STRATEGIES)}")
    STRATEGIES[name].check_config(cfg)


def build_strategy(cfg: DictConfig, initial_state: State) -> LayerwiseStrategy:
    """The configured strategy, starting from ``initial_state``."""
    return STRATEGIES[cfg.strategy.name].from_config(cfg, initial_state)


__all__ = ["STRATEGIES", "LayerwiseStrategy", "NodePlan", "build_strategy", "validate_strategy_config"]
