"""The ServerApp: builds the configured strategy and runs the rounds."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from omegaconf import DictConfig

from fedlayer.config import compose_config, resolve_resume, run_config_to_overrides
from fedlayer.server.loop import FederatedRun


def make_server_app(cfg: DictConfig | None = None) -> ServerApp:
    """A ServerApp; ``cfg`` fixes the resolved config (else Flower's run config is composed)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_cfg = cfg if cfg is not None else resolve_resume(compose_config(run_config_to_overrides(context.run_config)))
        FederatedRun(run_cfg).run(grid)

    return app


app = make_server_app()
