"""benchmarks.segments: a deployed message's segments from time-stamped Flower and fedlayer log lines.

The lines are Flower 1.39's own (INFO) and the one fedlayer's ClientApp logs
per message, as ``LoopbackDeployment`` stamps them; the times are chosen so
every segment has a known length; the second message's first ClientApp
process fails (Flower starts another), as under heavy load.
"""

from __future__ import annotations

import pytest

from benchmarks.segments import markdown, medians, message_segments

SUPERLINK = """\
100.000 2026-12-07T19:07:45.066Z INFO [uvicorn.access] 127.0.0.1:44642 - "POST /v1/runtime/push-messages HTTP/1.1" 200
110.000 INFO :      [Fleet.PushMessages] Push replies from node_id=7
110.500 2026-12-07T19:07:47.258Z INFO [uvicorn.access] 127.0.0.1:44642 - "POST /v1/runtime/confirm-message-received HTTP/1.1" 200
120.000 2026-12-07T19:07:49.574Z INFO [uvicorn.access] 127.0.0.1:44642 - "POST /v1/runtime/push-messages HTTP/1.1" 200
131.000 INFO :      [Fleet.PushMessages] Push replies from node_id=7
131.250 2026-12-07T19:07:55.385Z INFO [uvicorn.access] 127.0.0.1:44642 - "POST /v1/runtime/confirm-message-received HTTP/1.1" 200
"""
SUPERNODE = """\
99.000 INFO :      SuperNode ID: 7
101.000 INFO :      Receiving: train message (ID: 0d3a)
101.100 INFO :      Received successfully
103.000 INFO :      Start `flwr-clientapp` process
109.000 INFO :      fedlayer: train message answered cold in 5.000 s (imports 3.000 s), 2.50 s after the ClientApp process started
109.100 INFO :      Sending: train message (ID: 9221)
122.000 INFO :      Receiving: train message (ID: 1e4b)
122.200 INFO :      Received successfully
122.500 INFO :      Start `flwr-clientapp` process
122.900 ERROR :     [/v1/runtime/pull-task-input][ApiError:1008] Runtime task-token authentication failed.
124.000 INFO :      Start `flwr-clientapp` process
130.000 INFO :      fedlayer: train message answered warm in 0.100 s (imports 0.000 s), 6.50 s after the ClientApp process started
"""


def test_segments_from_the_logs(tmp_path):
    (tmp_path / "superlink.log").write_text(SUPERLINK)
    (tmp_path / "supernode-0.log").write_text(SUPERNODE)
    rows = message_segments(tmp_path)
    first, second = rows
    assert (first["path"], second["path"]) == ("cold", "warm")
    assert (first["process_starts"], second["process_starts"]) == (1, 2)  # the second's first process failed: timed from the one that answered
    expected_first = {"pickup": 1.1, "superexec_poll": 0.4, "process_flwr": 1.5, "app_imports": 4.0, "handler": 2.0, "reply": 1.5, "total": 10.5}
    expected_second = {"pickup": 2.2, "superexec_poll": 1.2, "process_flwr": 0.6, "app_imports": 5.9, "handler": 0.1, "reply": 1.25, "total": 11.25}
    for row, expected in ((first, expected_first), (second, expected_second)):
        assert {k: row[k] for k in expected} == pytest.approx(expected, abs=1e-6)
        assert sum(row[k] for k in expected if k != "total") == pytest.approx(row["total"], abs=1e-6)
    assert medians(rows) == pytest.approx({**expected_second, "messages": 1.0, "failed_starts": 1.0}, abs=1e-6)  # round 1 left out
    assert medians(rows, skip_first=False)["messages"] == 2.0
    table = markdown({"warm": medians(rows)})
    assert "| SuperNode's idle pick-up (push to received) | 2.20 |" in table and "| messages counted | 1 |" in table


def test_a_message_without_its_reply_is_left_out(tmp_path):
    (tmp_path / "superlink.log").write_text(SUPERLINK.splitlines(keepends=True)[0])
    (tmp_path / "supernode-0.log").write_text(SUPERNODE)
    assert message_segments(tmp_path) == [] and medians([]) == {} and markdown({"warm": {}}) == ""
