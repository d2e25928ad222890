"""The fault matrix (benchmarks/fault_matrix.py) on two strategies: every fault refused, no model corrupted."""

from __future__ import annotations

import json

import pytest

from benchmarks import fault_matrix
from fedlayer.methods.base import LayerwiseStrategy


@pytest.mark.parametrize("name", ["fedlama", "laq"])
def test_every_fault_is_refused_and_no_model_is_corrupted(name, tmp_path):
    cases = fault_matrix.run_matrix([name], tmp_path)
    assert [c.fault for c in cases] == fault_matrix.faults_of(name)
    assert {"duplicate", "huge", "scaled", "mislabelled", "nan", "corrupt-bytes"} <= {
        c.fault for c in cases
    }
    for case in cases:
        assert not case.corrupted, case
        assert (
            case.finite
            and case.global_equal
            and case.clients_equal
            and case.state_equal
        ), case
        assert case.honest_rejected == 0, case
        assert case.rejected + case.handled == case.faulty == 1, case
    if (
        name == "fedlama"
    ):  # a refused client is sent every layer next time: noted, not counted as corruption
        assert "resend: [4]" in next(c for c in cases if c.fault == "nan").refusal_state


def test_a_fault_that_gets_through_is_reported_as_corrupting(tmp_path, monkeypatch):
    """With the update-norm guard disabled, the scaled update is averaged in: the matrix must say so."""
    monkeypatch.setattr(
        LayerwiseStrategy,
        "guard_update_norms",
        lambda self, server_round, replies: replies,
    )
    case = fault_matrix.run_case("fedavg", "scaled", tmp_path)
    assert case.rejected == 0 and not case.handled
    assert case.corrupted and not case.global_equal
    report = fault_matrix.table([case])
    assert (
        "| scaled | 1: fedavg | 0/1 rejected | 1 |" in report
        and "Cases that missed the goal" in report
    )


def test_outputs(tmp_path):
    cases = [
        fault_matrix.run_case("fedavg", fault, tmp_path / fault)
        for fault in ("duplicate", "nan")
    ]
    report = fault_matrix.write(cases, tmp_path / "out")
    assert "| **total** | 2 | 2/2 rejected | 0 |" in report
    assert (tmp_path / "out" / "results.md").read_text() == report
    assert (
        len(json.loads((tmp_path / "out" / "results.json").read_text())["cases"]) == 2
    )
    assert (tmp_path / "out" / "results.csv").read_text().count("\n") == 3
