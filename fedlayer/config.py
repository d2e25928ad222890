"""One configuration tree for every way of running fedlayer.

The Hydra tree in ``fedlayer/conf`` is composed the same way by the Hydra CLI
(``fedlayer-sim``), by the ServerApp and ClientApp under ``flwr run`` (whose
run-config keys become Hydra overrides), by tests and by benchmarks. A bad
value fails at start with a ``ConfigError`` that names the field.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIG_MODULE = "fedlayer.conf"
CONF_DIR = Path(__file__).parent / "conf"
#: Config groups whose option is chosen by name (``strategy=fedlama``).
GROUPS = ("strategy", "dataset", "model", "federation")
#: Run-config key holding free-form Hydra overrides, space separated.
OVERRIDES_KEY = "overrides"


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the field."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"config field '{field}': {problem}")
        self.field = field


def group_options(group: str) -> list[str]:
    """Names of the options of a config group (files not starting with ``_``)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))


def _format_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and (value == "" or any(c in value for c in " ,=[]{}()'\"")):
        return "'" + value.replace("'", "\\'") + "'"
    return str(value)


def run_config_to_overrides(run_config: Mapping[str, Any]) -> list[str]:
    """Flower run-config (flat keys) as Hydra overrides.

    ``strategy``/``dataset``/``model``/``federation`` pick group options (an
    empty string keeps the default), ``overrides`` holds any Hydra overrides
    (``"federation.rounds=5 strategy.phi=4"``), and any other key ``a.b`` becomes
    ``a.b=value``.
    """
    overrides: list[str] = []
    for key, value in run_config.items():
        if key == OVERRIDES_KEY:
            overrides.extend(shlex.split(str(value)))
        elif key in GROUPS:
            if str(value):
                overrides.append(f"{key}={value}")
        else:
            overrides.append(f"{key}={_format_value(value)}")
    # Group choices first, so that later keys can set fields inside them.
    return sorted(overrides, key=lambda o: o.split("=", 1)[0] not in GROUPS)


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose and validate the config tree with the given overrides."""
    for override in overrides:
        key, _, value = override.partition("=")
        if key in GROUPS and value not in group_options(key):
            raise ConfigError(key, f"unknown option {value!r}; choose from {group_options(key)}")
    try:
        if GlobalHydra.instance().is_initialized():
            cfg = compose(config_name="config", overrides=list(overrides))
        else:
            with initialize_config_module(config_module=CONFIG_MODULE, version_base=None):
                cfg = compose(config_name="config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_field_in(str(err)), str(err).splitlines()[0]) from None
    validate_config(cfg)
    return cfg


def _field_in(message: str) -> str:
    for token in message.replace("'", " ").split():
        if "." in token and token.split(".")[0] in GROUPS + ("train", "evaluation"):
            return token.rstrip(":,")
    return "overrides"


Rule = tuple[str, Callable[[Any], bool], str]

_RULES: list[Rule] = [
    ("seed", lambda v: isinstance(v, int) and v >= 0, "must be an integer >= 0"),
    ("device", lambda v: v in ("auto", "cpu", "cuda") or (isinstance(v, str) and v.startswith("cuda:") and v[5:].isdigit()), "must be auto, cpu, cuda or cuda:N"),
    ("train.optimizer", lambda v: v in ("sgd", "adam"), "must be sgd or adam"),
    ("train.lr", lambda v: isinstance(v, (int, float)) and v > 0, "must be > 0"),
    ("train.momentum", lambda v: isinstance(v, (int, float)) and 0 <= v < 1, "must be in [0, 1)"),
    ("train.weight_decay", lambda v: isinstance(v, (int, float)) and v >= 0, "must be >= 0"),
    ("train.batch_size", lambda v: isinstance(v, int) and v >= 1, "must be an integer >= 1"),
    ("train.local_epochs", lambda v: isinstance(v, (int, float)) and v > 0, "must be > 0"),
    ("train.local_steps", lambda v: isinstance(v, int) and v >= 0, "must be an integer >= 0"),
    ("checkpoint_keep", lambda v: isinstance(v, int) and v >= 1, "must be an integer >= 1"),
    ("evaluation.every", lambda v: isinstance(v, int) and v >= 1, "must be an integer >= 1"),
    ("evaluation.max_examples", lambda v: isinstance(v, int) and v >= 0, "must be an integer >= 0"),
    ("dataset.partition.scheme", lambda v: v in ("iid", "dirichlet", "pathological"), "must be iid, dirichlet or pathological"),
    ("dataset.partition.alpha", lambda v: isinstance(v, (int, float)) and v > 0, "must be > 0"),
    ("dataset.partition.classes_per_client", lambda v: isinstance(v, int) and v >= 1, "must be an integer >= 1"),
    ("dataset.client_test_fraction", lambda v: isinstance(v, (int, float)) and 0 <= v < 1, "must be in [0, 1)"),
    ("dataset.central_test_fraction", lambda v: isinstance(v, (int, float)) and 0 < v < 1, "must be in (0, 1)"),
    ("dataset.image_size", lambda v: v is None or (isinstance(v, int) and v >= 4), "must be null or an integer >= 4"),
    ("federation.num_clients", lambda v: isinstance(v, int) and v >= 1, "must be an integer >= 1"),
    ("federation.rounds", lambda v: isinstance(v, int) and v >= 1, "must be an integer >= 1"),
    ("federation.fraction_train", lambda v: isinstance(v, (int, float)) and 0 < v <= 1, "must be in (0, 1]"),
    ("federation.min_train_nodes", lambda v: isinstance(v, int) and v >= 1, "must be an integer >= 1"),
    ("federation.min_available_nodes", lambda v: v is None or (isinstance(v, int) and v >= 1), "must be null or an integer >= 1"),
    ("federation.fraction_evaluate", lambda v: isinstance(v, (int, float)) and 0 <= v <= 1, "must be in [0, 1]"),
    ("federation.round_timeout", lambda v: isinstance(v, (int, float)) and v > 0, "must be > 0 seconds"),
    ("federation.min_replies", lambda v: isinstance(v, int) and v >= 1, "must be an integer >= 1"),
    ("federation.poll_interval", lambda v: isinstance(v, (int, float)) and 0 < v <= 10, "must be in (0, 10] seconds"),
]


def validate_config(cfg: DictConfig) -> None:
    """Check every field with a known rule; raise ``ConfigError`` naming it."""
    for field, check, problem in _RULES:
        value = OmegaConf.select(cfg, field, throw_on_missing=False)
        if not check(value):
            raise ConfigError(field, f"{problem}, got {value!r}")
    from fedlayer.strategies import validate_strategy_config

    validate_strategy_config(cfg)


def resolve_resume(cfg: DictConfig) -> DictConfig:
    """For ``resume=<run dir>``: that run's saved config, pointing at its directory.

    Only ``federation.rounds`` is taken from the new command line (to extend a run).
    """
    if not cfg.resume:
        return cfg
    run_dir = Path(str(cfg.resume)).resolve()
    saved_path = run_dir / "config.yaml"
    if not saved_path.exists():
        raise ConfigError("resume", f"{run_dir} is not a fedlayer run directory (no config.yaml)")
    saved = OmegaConf.load(saved_path)
    assert isinstance(saved, DictConfig)
    saved.resume = str(run_dir)
    saved.output_dir = str(run_dir.parent)
    saved.run_name = run_dir.name
    saved.federation.rounds = max(int(cfg.federation.rounds), int(saved.federation.rounds))
    validate_config(saved)
    return saved


def config_to_overrides(cfg: DictConfig) -> list[str]:
    """Overrides that compose exactly ``cfg`` again (group choices, then every leaf).

    Used to hand a resolved config (for example a resumed run's saved one) to
    apps that compose their own. Group options are named by their ``name`` field.
    """
    overrides = [f"{group}={cfg[group].name}" for group in GROUPS if "name" in cfg[group]]

    def leaves(node: Any, prefix: str) -> None:
        for key, value in node.items():
            path = f"{prefix}{key}"
            if isinstance(value, DictConfig):
                leaves(value, path + ".")
            elif OmegaConf.is_list(value):
                overrides.append(f"{path}=[{','.join(_format_value(v) for v in value)}]")
            else:
                overrides.append(f"{path}={'null' if value is None else _format_value(value)}")

    leaves(cfg, "")
    return overrides


def to_flat_dict(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as a plain nested dict (for summaries)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
