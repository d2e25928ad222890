"""``fedlayer-run`` without a SuperLink: run-config building, log filtering, failure lines.

The end-to-end cases (a completed run exits 0, a bad config value exits 1
with one line) are in tests/e2e/test_walkthrough.py.
"""

from __future__ import annotations

import shlex

import pytest
from flwr.common.config import parse_config_args

from fedlayer.config import run_config_to_overrides
from fedlayer.commands.submit import (
    RunError,
    default_app,
    first_line,
    run_config,
    submit,
    without_tracebacks,
)


def test_run_config_reaches_the_server_app_as_the_same_overrides():
    overrides = ["strategy=fedlama", "dataset=digits", "strategy.phi=4", "output_dir=/tmp/a b"]
    config = parse_config_args([run_config(overrides)])  # what Flower hands the ServerApp
    assert config["strategy"] == "fedlama" and config["dataset"] == "digits"
    assert shlex.split(config["overrides"]) == ["strategy.phi=4", "output_dir=/tmp/a b"]
    composed = run_config_to_overrides({"strategy": "fedavg", "dataset": "mnist5k", "model": "", **config})
    assert composed[:2] == ["strategy=fedlama", "dataset=digits"]


@pytest.mark.parametrize("bad", ["federation.rounds", "run_name=it's", 'run_name=a "b"'])
def test_run_config_refuses_what_cannot_travel(bad):
    with pytest.raises(RunError):
        run_config([bad])


def test_tracebacks_are_left_out_of_the_streamed_log():
    log = [
        "INFO :      Start `flwr-serverapp` process\n",
        "ERROR :     ServerApp raised an exception\n",
        "Traceback (most recent call last):\n",
        '  File "app.py", line 19, in main\n',
        "    run_cfg = compose_config()\n",
        "fedlayer.errors.ConfigError: config field 'federation.rounds': must be an integer >= 1, got 0\n",
        "ERROR :     Exit Code: 201\n",
    ]
    assert list(without_tracebacks(log)) == [log[0], log[1], log[6]]


def test_first_line_drops_colour_and_blank_lines():
    assert first_line("\n\x1b[91mconfig field 'x': bad\x1b[0m\nmore\n") == "config field 'x': bad"


def test_an_unreachable_superlink_is_one_line(monkeypatch, tmp_path):
    """``flwr run`` reports a connection problem in its JSON; fedlayer-run says it in one line."""
    home = tmp_path / "flwr"
    home.mkdir()
    (home / "config.toml").write_text('[superlink.nowhere]\naddress = "127.0.0.1:9"\ninsecure = true\n')
    monkeypatch.setenv("FLWR_HOME", str(home))
    monkeypatch.setenv("FLWR_DISABLE_UPDATE_CHECK", "1")
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    with pytest.raises(RunError, match=r"^could not start the run: [^\n]+$"):
        submit(app=default_app(), connection="nowhere", overrides=[])
