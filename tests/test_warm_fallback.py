"""The deployment benchmarks count the messages answered warm and cold, and flag a warm variant that ran cold.

The log lines are real: cut from the SuperNode logs of loopback deployments
(``LoopbackDeployment`` stamps each line on arrival; Flower's INFO lines keep
their colour codes), one excerpt per case:

- ``KILLED``: ``benchmarks.deployment_scale --nodes 2 --rounds 3 --variants warm``,
  the node's warm worker SIGKILLed after round 1: round 2 ran cold, round 3
  warm again after ``fedlayer-client`` restarted the worker;
- ``OTHER_CODE``: ``benchmarks.flower_overhead --deployment``, warm, while a
  source file changed: the worker ran other code, every message ran cold;
- ``STOPPED``: a warm node whose worker ended as the deployment stopped (after
  its last message: no message ran cold);
- ``BASELINE``: Flower's own app (``benchmarks/flower_baseline_app.py``).
"""

from __future__ import annotations

import csv
import json

from benchmarks import segments
from benchmarks.deployment_scale import Measurement, count_answers, write_results
from benchmarks.flower_overhead import SideResult, pooled_answers, variants_report
from benchmarks.flower_overhead import count_answers as count_side_answers

INFO, WARNING = "\x1b[92mINFO \x1b[0m:      ", "\x1b[93mWARNING \x1b[0m:   "
KILLED = f"""\
1796680819.165 {INFO}SuperNode ID: 3065134499921468607
1796680826.462 fedlayer warm worker: ready on /tmp/fedlayer-loopback-_m9q1j_g/cache/fedlayer/127.0.0.1_33155-partition-0-of-2/warm/worker.sock (pid 30532, code 7a70da5eff4b)
1796680832.522 {INFO}Receiving: query message (ID: ea2e0efd73c0c090e3001cd5908a7428b952a96d5b8d108cb712f2c5de6f540f)
1796680835.492 fedlayer warm worker: served query run 9699519173835023433 node 3065134499921468607 in 0.001 s (no model)
1796680835.494 {INFO}fedlayer: query message answered warm in 0.096 s (imports 0.000 s), 2.86 s after the ClientApp process started
1796680836.038 {INFO}Receiving: train message (ID: 8dc0fc334f168db3d75a2324a1854e1fc3a16600b7c3ee99244459f538b1abc9)
1796680845.119 fedlayer warm worker: served train run 9699519173835023433 node 3065134499921468607 in 5.341 s (new model)
1796680845.126 {INFO}fedlayer: train message answered warm in 5.428 s (imports 0.000 s), 3.56 s after the ClientApp process started
1796680845.481 fedlayer-client: the warm worker ended (status -9); messages run cold until it is back, restarting in 1 s
1796680845.687 {INFO}Receiving: train message (ID: 9913d89611d3ed3d5aa6a840f348da6504d4745b5fe143d1a4d752b880a0f393)
1796680853.847 fedlayer warm worker: ready on /tmp/fedlayer-loopback-_m9q1j_g/cache/fedlayer/127.0.0.1_33155-partition-0-of-2/warm/worker.sock (pid 31010, code 7a70da5eff4b)
1796680855.578 {INFO}fedlayer: train message answered cold in 6.017 s (imports 4.149 s), 3.84 s after the ClientApp process started
1796680855.890 {INFO}Receiving: train message (ID: affd27966bceee98567b75dd5464351241e8050d2b980c53d1cccf06e1ac8fb6)
1796680859.157 fedlayer warm worker: served train run 9699519173835023433 node 3065134499921468607 in 0.043 s (new model)
1796680859.157 {INFO}fedlayer: train message answered warm in 0.095 s (imports 0.000 s), 3.10 s after the ClientApp process started
"""
OTHER_CODE = f"""\
1796674417.616 fedlayer warm worker: ready on /tmp/fedlayer-loopback-h2w_txfc/cache/fedlayer/127.0.0.1_57495-partition-0-of-2/warm/worker.sock (pid 8995, code 7bb2a0379ccb)
1796674424.157 {WARNING}fedlayer: the warm worker runs other code (7bb2a0379ccb, this app dd0b58dd361a); running cold
1796674426.397 {INFO}fedlayer: query message answered cold in 2.147 s (imports 2.146 s), 2.19 s after the ClientApp process started
1796674430.633 {WARNING}fedlayer: the warm worker runs other code (7bb2a0379ccb, this app dd0b58dd361a); running cold
1796674442.998 {INFO}fedlayer: train message answered cold in 12.368 s (imports 2.564 s), 3.57 s after the ClientApp process started
"""
STOPPED = f"""\
1796674184.991 {INFO}fedlayer: train message answered warm in 4.727 s (imports 0.000 s), 2.42 s after the ClientApp process started
1796674199.341 fedlayer-client: the warm worker ended (status 143); messages run cold until it is back, restarting in 1 s
"""
BASELINE = f"""\
1796674920.655 {INFO}flower baseline: train message answered cold in 15.188 s (imports 0.000 s), 5.91 s after the ClientApp process started
"""


def logs(tmp_path, name, *nodes):
    """A deployment's logs folder with one ``supernode-<i>.log`` per text in ``nodes``."""
    folder = tmp_path / name
    folder.mkdir()
    for index, text in enumerate(nodes):
        (folder / f"supernode-{index}.log").write_text(text)
    return folder


def measurement(variant):
    return Measurement(
        variant=variant, method="fedavg", nodes=2, rounds=3, seconds_per_round=3.6, median_seconds_per_round=3.6,
        rounds_counted=[2, 3], round1_seconds=13.0, superlink_peak_mib=818, serverapp_peak_mib=549,
        supernodes_peak_mib=2081, device_peak_mib=1040, bytes_per_round=18e3, traffic_ratio_vs_fedavg=1.0,
        run_wall_seconds=50, load_average_1min_after=3.5, run_dir="runs",
    )


def test_every_fedlayer_answer_is_counted_by_its_path_with_the_reasons_logged_before_it(tmp_path):
    paths = segments.answered_paths(logs(tmp_path, "all", KILLED, OTHER_CODE, STOPPED, BASELINE))
    # Flower's app is not fedlayer's; the worker that ended as the deployment stopped explains no answer
    assert paths == segments.Paths(warm=4, cold=3, reasons={"the warm worker ended": 1, "the warm worker runs other code": 2})
    assert segments.answered_paths(logs(tmp_path, "stopped", STOPPED)) == segments.Paths(warm=1, cold=0)


def test_deployment_scale_flags_a_warm_run_that_ran_cold_in_every_output(tmp_path, capsys):
    runs = {"warm": logs(tmp_path, "warm", KILLED), "cold": logs(tmp_path, "cold", OTHER_CODE), "warm-idle3": logs(tmp_path, "idle3", STOPPED)}
    measured = []
    for variant, folder in runs.items():
        m = measurement(variant)
        count_answers(m, folder, f"{variant} fedavg, 2 nodes")
        measured.append(m)
    printed = capsys.readouterr().out
    assert printed == ("WARNING: warm fedavg, 2 nodes: 1 of 4 messages ran cold in a warm variant (the warm worker ended x1); "
                       "its timings mix warm and cold\n")  # the cold variant and the all-warm one are not flagged
    out = tmp_path / "out"
    out.mkdir()
    write_results(out, {"nodes": [2]}, measured)

    rows = json.loads((out / "results.json").read_text())["measurements"]
    assert [(r["variant"], r["answered_warm"], r["answered_cold"], r["ran_cold"]) for r in rows] == [
        ("warm", 3, 1, True), ("cold", 0, 2, False), ("warm-idle3", 1, 0, False)]
    assert rows[0]["cold_reasons"] == "the warm worker ended x1" and rows[1]["cold_reasons"] == "the warm worker runs other code x2"
    with open(out / "results.csv", encoding="utf-8") as fh:
        assert [(r["variant"], r["ran_cold"]) for r in csv.DictReader(fh)] == [("warm", "True"), ("cold", "False"), ("warm-idle3", "False")]
    table = (out / "results.md").read_text()
    assert "| 100.0% | 3 / 1 **RAN COLD** |" in table and "| 100.0% | 0 / 2 |" in table and "| 100.0% | 1 / 0 |" in table
    assert "**A warm variant ran cold** (its times mix both paths; rerun it): warm fedavg, N=2: 1 of 4 messages ran cold (the warm worker ended x1)." in table


def test_flower_overhead_flags_a_warm_variant_that_ran_cold(tmp_path, capsys):
    def run(variant, folder):
        result = SideResult(variant, {2: 3.0}, "metrics.jsonl", 0.9, "log")
        count_side_answers(result, variant, folder, f"[1/2] {variant}, 2 SuperNodes")
        return result

    warm = [run("warm", logs(tmp_path, "warm-1", STOPPED)), run("warm", logs(tmp_path, "warm-2", OTHER_CODE))]
    flower = [run("flower", logs(tmp_path, "flower", BASELINE))]
    assert capsys.readouterr().out.startswith("WARNING: [1/2] warm, 2 SuperNodes: 2 of 2 messages ran cold")
    pooled = pooled_answers("warm", warm)
    assert pooled == {"warm": 1, "cold": 2, "reasons": {"the warm worker runs other code": 2}, "ran_cold": True}
    entry = {"stats": {"median": 3.0}, "device_peak_mib": 1000.0}
    report = variants_report({"variants": {"flower": {**entry, "answered": pooled_answers("flower", flower)},
                                           "warm": {**entry, "answered": pooled}}, "ratios": {}})
    assert "| flower | 3.00 | - | 1000 | - |" in report and "| warm | 3.00 | - | 1000 | 1 / 2 **RAN COLD** |" in report
    assert ("WARNING: warm: 2 of 3 messages ran cold in a warm variant (the warm worker runs other code x2); "
            "its timings mix warm and cold") in report
