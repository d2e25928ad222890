"""One configuration tree for every way of running fedlayer.

The Hydra tree in ``fedlayer/conf`` is composed and validated once per run:
by the Hydra CLI (``fedlayer-sim``), by the ServerApp under ``flwr run``
(whose run-config keys become Hydra overrides), by tests and benchmarks. A bad
value fails at start with a ``ConfigError`` that names the field.

Clients never run Hydra: in simulation they receive the server's resolved
config; a deployed ClientApp (a fresh process per message) reads the same
YAML files and run-config overrides with plain OmegaConf (``load_config``),
which gives the same tree without Hydra's import and defaults machinery.
"""

from __future__ import annotations

import importlib.util
import shlex
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedlayer.codec.options import CODEC_RULES, LEVER_WIDTHS, CodecOptions
from fedlayer.errors import ConfigError
from fedlayer.privacy.settings import FIELD_RULES as PRIVACY_RULES
from fedlayer.privacy.settings import Privacy
from fedlayer.privacy.settings import cross_field_problem as privacy_cross_field_problem

CONFIG_MODULE = "fedlayer.conf"
CONF_DIR = Path(__file__).parent / "conf"
#: Config groups whose option is chosen by name (``strategy=fedlama``).
GROUPS = ("strategy", "dataset", "model", "federation", "codec")
#: Run-config key holding free-form Hydra overrides, space separated.
OVERRIDES_KEY = "overrides"


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
    """Compose (with Hydra) and validate the config tree with the given overrides."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    check_group_choices(overrides)
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


def check_group_choices(overrides: Sequence[str], *, sweeps: bool = False) -> None:
    """Refuse an unknown option of a config group (``strategy=fedavgg``), naming the choices.

    ``fedlayer-sim`` calls it before Hydra composes (Hydra's own error is a long search-path
    dump). With ``sweeps`` (``--multirun``) each value of a comma-separated list is checked;
    sweep functions (``glob(...)``, ``choice(...)``) are left to Hydra.
    """
    for override in overrides:
        key, _, value = override.partition("=")
        if key not in GROUPS or (sweeps and "(" in value):
            continue
        for option in value.split(",") if sweeps else [value]:
            if option not in group_options(key):
                raise ConfigError(key, f"unknown option {option!r}; choose from {group_options(key)}")


def load_config(overrides: Sequence[str] = ()) -> DictConfig:
    """The tree ``compose_config`` gives, built with plain OmegaConf (no Hydra, no validation).

    For clients: the server has validated the same overrides. Handles what
    fedlayer's tree uses: one option per group, a group file's own
    ``defaults`` (``_common``, ``_self_``), and ``key=value`` overrides.
    """
    check_group_choices(overrides)
    root = OmegaConf.load(CONF_DIR / "config.yaml")
    choices = {group: option for entry in root.pop("defaults") if isinstance(entry, DictConfig)
               for group, option in entry.items() if group in GROUPS}
    values: list[str] = []
    for override in overrides:
        key, _, value = override.partition("=")
        if key in GROUPS:
            choices[key] = value
        else:
            values.append(override)
    root.pop("hydra")
    cfg = OmegaConf.create({group: _load_option(group, option) for group, option in choices.items()})
    cfg = OmegaConf.merge(cfg, root, OmegaConf.from_dotlist(values))
    assert isinstance(cfg, DictConfig)
    return cfg


def _load_option(group: str, option: str) -> DictConfig:
    """A group option's YAML with its own ``defaults`` list applied (``_self_`` last by default)."""
    node = OmegaConf.load(CONF_DIR / group / f"{option}.yaml")
    parts: list[Any] = []
    defaults = node.pop("defaults", None) or ["_self_"]
    if "_self_" not in defaults:
        defaults = [*defaults, "_self_"]
    for entry in defaults:
        parts.append(node if entry == "_self_" else OmegaConf.load(CONF_DIR / group / f"{entry}.yaml"))
    merged = OmegaConf.merge(*parts)
    assert isinstance(merged, DictConfig)
    return merged


def _field_in(message: str) -> str:
    for token in message.replace("'", " ").split():
        if "." in token and token.split(".")[0] in GROUPS + ("train", "evaluation", "aggregation", "codec", "simulation", "server_state", "identity", "logging", "privacy"):
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
    ("aggregation.norm_guard", lambda v: isinstance(v, bool), "must be true or false"),
    ("simulation.ray_address", lambda v: v is None or (isinstance(v, str) and (v == "auto" or ":" in v)), "must be null, auto or host:port"),
    ("simulation.client_cpus", lambda v: isinstance(v, (int, float)) and v > 0, "must be > 0"),
    ("simulation.client_gpus", lambda v: isinstance(v, (int, float)) and v >= 0, "must be >= 0"),
    ("identity.bind", lambda v: v in ("auto", "key", "none"), "must be auto, key or none"),
    ("identity.release", lambda v: isinstance(v, ListConfig) and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in v),
     "must be a list of client ids (integers >= 0)"),
    ("logging.tensorboard", lambda v: isinstance(v, bool), "must be true or false"),
    ("logging.mlflow", lambda v: isinstance(v, bool), "must be true or false"),
    ("logging.mlflow", lambda v: not v or importlib.util.find_spec("mlflow") is not None,
     "needs MLflow, which is not installed: pip install 'fedlayer[mlflow]'"),
    ("logging.mlflow_uri", lambda v: v is None or (isinstance(v, str) and v != ""), "must be null or a tracking URI"),
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
    ("federation.wait_timeout", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0, "must be > 0 seconds"),
    ("federation.fraction_evaluate", lambda v: isinstance(v, (int, float)) and 0 <= v <= 1, "must be in [0, 1]"),
    ("federation.round_timeout", lambda v: isinstance(v, (int, float)) and v > 0, "must be > 0 seconds"),
    ("federation.min_replies", lambda v: isinstance(v, int) and v >= 1, "must be an integer >= 1"),
    ("federation.poll_interval", lambda v: isinstance(v, (int, float)) and 0 < v <= 10, "must be in (0, 10] seconds"),
]


def validate_config(cfg: DictConfig) -> None:
    """Check every field with a known rule; raise ``ConfigError`` naming it.

    Strategy fields are checked by the strategy's constructor, when the
    server builds it (``fedlayer.server.builder``).
    """
    for field, check, problem in _RULES:
        value = OmegaConf.select(cfg, field, throw_on_missing=False)
        if not check(value):
            raise ConfigError(field, f"{problem}, got {value!r}")
    _validate_codec(cfg)
    if "privacy" in cfg:  # runs saved before the privacy section have none (off)
        for field, check, problem in PRIVACY_RULES:
            value = OmegaConf.select(cfg, f"privacy.{field}", throw_on_missing=False)
            if not check(value):
                raise ConfigError(f"privacy.{field}", f"{problem}, got {value!r}")
        if (mismatch := privacy_cross_field_problem(Privacy.from_config(cfg.privacy))) is not None:
            raise ConfigError(f"privacy.{mismatch[0]}", mismatch[1])


def _validate_codec(cfg: DictConfig) -> None:
    """The codec's levers (``codec.*``; runs saved before them have none) and the widths they take."""
    for field, check, problem in CODEC_RULES:
        if field in cfg.codec and not check(cfg.codec[field]):
            raise ConfigError(f"codec.{field}", f"{problem}, got {cfg.codec[field]!r}")
    options = CodecOptions.from_config(cfg.codec)
    if (problem := options.combination_problem()) is not None:
        field, why = problem
        raise ConfigError(f"codec.{field}", f"{why}, got {getattr(options, field)!r}")
    if options.levers_on:
        for field in ("up_bits", "down_bits"):
            if cfg.codec[field] not in LEVER_WIDTHS:
                raise ConfigError(f"codec.{field}", f"must be one of {list(LEVER_WIDTHS)} with codec levers on, got {cfg.codec[field]!r}")


def resolve_resume(cfg: DictConfig) -> DictConfig:
    """For ``resume=<run dir>``: that run's saved config, pointing at its directory.

    Only ``federation.rounds`` (to extend a run) and ``identity.release`` are
    taken from the new command line.
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
    saved.identity = OmegaConf.merge(saved.get("identity", cfg.identity), {"release": cfg.identity.release})
    for key, value in cfg.federation.items():  # federation fields added since that run started
        if key not in saved.federation:
            saved.federation[key] = value
    if "logging" not in saved:  # a run started before the logging section
        saved.logging = cfg.logging
    validate_config(saved)
    return saved
