"""``flower-superlink`` without its HTTP access log: what ``fedlayer-server`` runs by default.

Flower 1.39's SuperLink serves its Control and runtime APIs with uvicorn and
logs one ``[uvicorn.access]`` line per request (about 1,450 lines for three
rounds of two nodes), which buries the lines that matter. Flower offers no
option for it, so this entry point raises that one logger to WARNING (failed
requests, 4xx/5xx, are still logged by uvicorn's error logger) and then runs
Flower's own ``flower-superlink`` in this process, with the same arguments.
``fedlayer-server --verbose`` runs plain ``flower-superlink`` instead.

    python -m fedlayer.commands.quiet_superlink <flower-superlink options>
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Sequence
from typing import Any

ACCESS_LOGGER = "uvicorn.access"


def without_access_log(log_config: dict[str, Any]) -> dict[str, Any]:
    """A uvicorn logging config whose access logger only passes warnings and worse."""
    loggers = {**log_config.get("loggers", {})}
    loggers[ACCESS_LOGGER] = {**loggers.get(ACCESS_LOGGER, {}), "level": logging.WARNING}
    return {**log_config, "loggers": loggers}


def main(argv: Sequence[str] | None = None) -> None:
    """Run ``flower-superlink`` with ``argv`` (default: this process's arguments)."""
    # the module, not the function of the same name that flwr.superlink.cli exports
    superlink_cli = importlib.import_module("flwr.superlink.cli.flower_superlink")
    flower_config = superlink_cli.get_uvicorn_log_config
    superlink_cli.get_uvicorn_log_config = lambda level: without_access_log(flower_config(level))
    sys.argv = ["flower-superlink", *(sys.argv[1:] if argv is None else argv)]
    superlink_cli.flower_superlink()


if __name__ == "__main__":
    main()
