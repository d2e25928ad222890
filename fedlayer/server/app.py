"""The ServerApp: builds the configured strategy and runs the rounds."""

from __future__ import annotations

from logging import INFO
from typing import Any

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from omegaconf import DictConfig

from fedlayer.config import compose_config, resolve_resume, run_config_to_overrides
from fedlayer.server.flower_patches import shorten_reply_pull_backoff
from fedlayer.server.loop import FederatedRun


def make_server_app(cfg: DictConfig | None = None) -> ServerApp:
    """A ServerApp; ``cfg`` fixes the resolved config (else Flower's run config is composed)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_cfg = cfg if cfg is not None else resolve_resume(compose_config(run_config_to_overrides(context.run_config)))
        shorten_reply_pull_backoff(grid)  # deployment only: replies are pulled as objects
        summary = FederatedRun(run_cfg).run(grid)
        for line in summary_lines(summary):  # fedlayer-run prints these when the run is over
            log(INFO, "%s", line)

    return app


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The run directory and the headline numbers, as ``fedlayer-sim`` and ``fedlayer-run`` print them."""
    accuracy = summary["final_accuracy"]
    ratio = summary["traffic_ratio_vs_fedavg"]
    return [
        f"fedlayer: run directory {summary['run_dir']}",
        f"fedlayer: final accuracy {'-' if accuracy is None else f'{accuracy:.4f}'}; traffic "
        f"{summary['bytes_total'] / 1e6:.1f} MB = {'-' if ratio is None else f'{ratio:.1%}'} of FedAvg's "
        f"{summary['fedavg_bytes_total'] / 1e6:.1f} MB",
    ]


app = make_server_app()
