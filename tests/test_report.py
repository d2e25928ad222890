"""``fedlayer report`` on real short runs, and the shared plotting module."""

from __future__ import annotations

import csv
import json
import shutil

import matplotlib.pyplot as plt
import pytest

from fedlayer.config import compose_config
from fedlayer.plots import plot_accuracy
from fedlayer.report import main
from fedlayer.server.rundir import RunDirectory
from tests.inprocess import run_in_process

COMMON = ["dataset=digits", "model=linear", "train.local_steps=2", "evaluation.max_examples=100",
          "federation.num_clients=2", "federation.rounds=2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A FedAvg and a FedLAMA run: their directories and summaries."""
    root = tmp_path_factory.mktemp("runs")
    out = []
    for method in ("fedavg", "fedlama"):
        _, summary = run_in_process(compose_config([*COMMON, f"strategy={method}", f"output_dir={root}", f"run_name={method}"]))
        out.append((root / method, summary))
    return out


def test_report_prints_one_row_per_run_and_writes_the_table_and_figures(runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", *(str(path) for path, _ in runs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split()[:4] == ["run", "method", "dataset", "rounds"]
    for (path, summary), line in zip(runs, printed[1:3]):
        assert line.split()[:5] == [path.name, summary["strategy"], "digits", "2/2", f"{summary['final_accuracy']:.4f}"]
    with open(out / "runs.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows == [{k: str(v) for k, v in row.items()} for row in json.loads((out / "runs.json").read_text())]
    for (_, summary), row in zip(runs, rows):
        assert float(row["final_accuracy"]) == summary["final_accuracy"]
        assert float(row["megabytes"]) == summary["bytes_total"] / 1e6
        assert float(row["share_of_fedavg"]) == summary["traffic_ratio_vs_fedavg"]
        assert (int(row["refusals"]), int(row["dropped_rounds"]), row["status"]) == (0, 0, "finished")
    for figure in ("accuracy.png", "layer_bytes.png", "client_latency.png"):
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / figure).stat().st_size > 5000


def test_a_run_without_summary_is_reported_from_its_metrics(runs, tmp_path, capsys):
    path = shutil.copytree(runs[0][0], tmp_path / "unfinished")
    (path / "summary.json").unlink()
    (line,) = RunDirectory(path).read_metrics()[-1:]
    assert main(["report", str(path), "--out", str(tmp_path / "out")]) == 0
    row = json.loads((tmp_path / "out" / "runs.json").read_text())[0]
    assert row["status"] == "running" and row["final_accuracy"] == line["accuracy"]
    assert row["megabytes"] == pytest.approx(runs[0][1]["bytes_total"] / 1e6, rel=1e-12)


def test_a_path_that_is_not_a_run_directory_is_one_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"fedlayer report: error: {tmp_path} is not a fedlayer run directory (it needs config.yaml and metrics.jsonl)"


def test_accuracy_by_round_has_integer_round_ticks():
    records = [{"round": r, "accuracy": 0.1 * r, "bytes_up": 10, "bytes_down": 10} for r in (1, 2, 3)]
    fig, (ax_round, ax_bytes) = plt.subplots(1, 2)
    plot_accuracy(ax_round, ax_bytes, records)
    fig.canvas.draw()
    ticks = [t for t in ax_round.get_xticks() if 1 <= t <= 3]
    plt.close(fig)
    assert ticks == [1, 2, 3]


def test_the_benchmarks_figure_comes_from_the_same_module(runs, tmp_path):
    """The benchmark harness's accuracy-against-bytes figure: one panel per setting."""
    from benchmarks.report import plot_accuracy_vs_bytes

    results = [{"setting": "digits", "variant": path.name, "run_dir": str(path)} for path, _ in runs]
    plot_accuracy_vs_bytes(results, tmp_path / "accuracy_vs_bytes.png")
    assert (tmp_path / "accuracy_vs_bytes.png").stat().st_size > 1000


def test_the_harness_drops_a_finished_runs_resume_state_and_the_report_still_reads_it(tmp_path):
    from pathlib import Path

    from benchmarks.harness import RESUME_STATE, drop_resume_state

    _, summary = run_in_process(compose_config([*COMMON, "codec=b4", f"output_dir={tmp_path}", "run_name=coded"]))
    run_dir = Path(summary["run_dir"])
    assert (run_dir / "checkpoints").is_dir()
    drop_resume_state(run_dir)
    assert not any((run_dir / name).exists() for name in RESUME_STATE)
    assert json.loads((run_dir / "summary.json").read_text())["final_accuracy"] == summary["final_accuracy"]
    assert main(["report", str(run_dir), "--out", str(tmp_path / "report")]) == 0
