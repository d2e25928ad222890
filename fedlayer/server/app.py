"""The ServerApp: builds the configured strategy and runs the rounds."""

from __future__ import annotations

from collections.abc import Sequence

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedlayer.config import compose_config, resolve_resume, run_config_to_overrides
from fedlayer.server.loop import FederatedRun


def make_server_app(overrides: Sequence[str] | None = None) -> ServerApp:
    """A ServerApp; ``overrides`` fixes the config (else Flower's run config is used)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        chosen = overrides if overrides is not None else run_config_to_overrides(context.run_config)
        FederatedRun(resolve_resume(compose_config(chosen))).run(grid)

    return app


app = make_server_app()
