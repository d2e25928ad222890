"""``fedlayer-sim``: run a simulation from the Hydra command line.

    fedlayer-sim strategy=fedavg dataset=mnist5k federation.rounds=5
    fedlayer-sim --multirun dataset=mnist5k,animal10k seed=0,1

Each job composes the config tree, then runs the ServerApp and one SuperNode
per client in Flower's simulation engine (``flwr.simulation.run_simulation``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fedlayer.config import check_group_choices, compose_config, resolve_resume
from fedlayer.errors import ConfigError
from fedlayer.server.builder import build_strategy
from fedlayer.server.rundir import default_run_name
from fedlayer.workload import load_workload


class SimulationFailed(RuntimeError):
    """The simulation stopped before the end of its run."""


def simulate(overrides: Sequence[str]) -> dict[str, Any]:
    """Run one simulation with these Hydra overrides; return its summary."""
    from flwr.simulation import run_simulation

    from fedlayer.client.app import make_client_app
    from fedlayer.server.app import make_server_app, summary_lines

    cfg = resolve_resume(compose_config(overrides))
    build_strategy(cfg, load_workload(cfg, int(cfg.federation.num_clients)))  # fail fast, before starting the engine
    if cfg.run_name is None:
        cfg.run_name = default_run_name(cfg)
    if cfg.client_state_dir is None:  # simulated clients share this disk: keep their state with the run
        cfg.client_state_dir = str(Path(cfg.output_dir).resolve() / cfg.run_name / "client-state")
    summary_path = Path(cfg.output_dir).resolve() / cfg.run_name / "summary.json"
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    error = summary_path.with_name("error.txt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            run_simulation(
                server_app=make_server_app(cfg),  # server and clients share this resolved config
                client_app=make_client_app(cfg),
                num_supernodes=int(cfg.federation.num_clients),
                backend_config=backend_config(cfg),
            )
        except Exception:  # the ServerApp's exception, re-raised by the engine
            if error.exists():  # a stop the run explained (error.txt): say that, not the traceback
                raise SimulationFailed(error.read_text().strip()) from None
            raise
    if not summary_path.exists():
        raise SimulationFailed(f"the simulation ended without writing {summary_path}; see the log above")
    summary = json.loads(summary_path.read_text())
    for line in summary_lines(summary):
        print(line)
    return summary


def backend_config(cfg: DictConfig) -> dict[str, Any]:
    """Flower's Ray backend config: each client's resources, and the cluster to join (``simulation.*``)."""
    # "local": a Ray instance of this run's own, even when a cluster runs on this machine
    # (Ray would otherwise join the newest cluster started here).
    address = str(cfg.simulation.ray_address) if cfg.simulation.ray_address else "local"
    init_args: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True, "address": address}
    return {
        "client_resources": {"num_cpus": float(cfg.simulation.client_cpus), "num_gpus": float(cfg.simulation.client_gpus)},
        "init_args": init_args,
    }


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def _hydra_main(cfg: DictConfig) -> None:
    try:
        simulate(HydraConfig.get().overrides.task)
    except ConfigError as err:
        print(f"fedlayer-sim: error: {err}", file=sys.stderr)
        sys.exit(2)
    except SimulationFailed as err:
        print(f"fedlayer-sim: error: {err}", file=sys.stderr)
        sys.exit(1)


def main() -> None:
    """Console entry point; an unknown group option is refused in one line before Hydra composes."""
    args = sys.argv[1:]
    try:
        check_group_choices([a for a in args if not a.startswith("-")], sweeps=bool({"-m", "--multirun"} & set(args)))
    except ConfigError as err:
        print(f"fedlayer-sim: error: {err}", file=sys.stderr)
        sys.exit(2)
    _hydra_main()


if __name__ == "__main__":
    main()
