"""The FAB `flwr run` builds from this checkout carries the apps' code and conf, and nothing else.

Flower 1.39 unpacks and re-hashes the whole FAB in every ``flwr-clientapp``
process, one per message; ``[tool.flwr.app] fab-include`` in pyproject.toml
keeps tests/, docs/ and benchmarks/ out of it. The FAB is built as ``flwr
run`` builds it (``build_fab_from_disk`` on the app folder ``fedlayer-run``
submits) and installed as ``flwr-clientapp`` installs it (``install_from_fab``);
the ClientApp is then loaded from the installed folder as Flower loads it.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from flwr.cli.build import build_fab_from_disk
from flwr.cli.install import install_from_fab

from fedlayer.client.warm.protocol import code_digest
from fedlayer.commands.submit import default_app

#: Run in a fresh interpreter inside the installed FAB: load the ClientApp the way
#: ``flwr-clientapp`` does (``load_app`` puts the app folder first on ``sys.path``),
#: find the ServerApp's module, and hash the fedlayer sources that were loaded.
PROBE = """
import importlib.util, json, sys
from pathlib import Path
from flwr.clientapp import ClientApp
from flwr.common.config import get_project_config
from flwr.supercore.object_ref import load_app
app_dir = Path(sys.argv[1])
components = get_project_config(app_dir)["tool"]["flwr"]["app"]["components"]
client = load_app(components["clientapp"], RuntimeError, app_dir)
from fedlayer.client.warm import protocol
print(json.dumps({
    "clientapp": isinstance(client, ClientApp),
    "clientapp_file": sys.modules[components["clientapp"].partition(":")[0]].__file__,
    "serverapp_file": importlib.util.find_spec(components["serverapp"].partition(":")[0]).origin,
    "digest": protocol.code_digest(),
}))
"""


def package_files(root: Path, pattern: str) -> set[str]:
    """Paths (relative to ``root``) of the fedlayer package's files matching ``pattern``, caches left out."""
    return {p.relative_to(root).as_posix() for p in (root / "fedlayer").glob(pattern) if "__pycache__" not in p.parts}


def test_the_fab_holds_the_apps_modules_and_conf_only(tmp_path):
    app = default_app()
    fab = build_fab_from_disk(app)
    names = set(zipfile.ZipFile(io.BytesIO(fab)).namelist()) - {"pyproject.toml", ".info/CONTENT"}

    strays = sorted(n for n in names if not n.startswith("fedlayer/"))
    assert not strays, f"the FAB carries files neither app needs: {strays[:10]} ({len(strays)} in all)"
    # every module (the warm handshake hashes them all) and every conf file of the package
    assert names == package_files(app, "**/*.py") | package_files(app, "conf/**/*.yaml")
    assert {"fedlayer/server/app.py", "fedlayer/client/app.py", "fedlayer/client/warm/forward.py", "fedlayer/conf/config.yaml"} <= names

    installed = install_from_fab(fab, install_dir=tmp_path, skip_prompt=True)
    done = subprocess.run([sys.executable, "-c", PROBE, str(installed)], capture_output=True, text=True, timeout=120, check=False,
                          cwd=tmp_path, env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"})
    assert done.returncode == 0, done.stderr[-3000:]
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    assert probe["clientapp"]
    for key in ("clientapp_file", "serverapp_file"):
        assert Path(probe[key]).is_relative_to(installed), probe  # loaded from the FAB, not from the installed package
    assert probe["digest"] == code_digest()  # the warm worker (this checkout's fedlayer) accepts the FAB's forwarder
