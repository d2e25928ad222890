"""One run in this process, without the simulation engine: ``python -m benchmarks.inprocess_run OVERRIDE ...``.

The real round loop and the real ClientApp, one node per partition, each
message through a protobuf round trip (``tests.inprocess.InProcessGrid``), so
bytes and models are those of a ``fedlayer-sim`` run with the same overrides
(up to node ids) while no Ray actor is started: for benchmarks on a busy
machine (the harness's ``--in-process``). Prints the run directory as
``fedlayer-sim`` does.
"""

from __future__ import annotations

import sys

from fedlayer.config import compose_config
from tests.inprocess import run_in_process


def main(argv: list[str] | None = None) -> None:
    cfg = compose_config(sys.argv[1:] if argv is None else argv)
    _, summary = run_in_process(cfg)
    print(f"fedlayer: run directory {summary['run_dir']}", flush=True)


if __name__ == "__main__":
    main()
