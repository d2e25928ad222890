"""The fault matrix (benchmarks/fault_matrix.py) on two strategies: every fault refused, no model corrupted."""

from __future__ import annotations

import json

import pytest

from benchmarks import fault_matrix
from benchmarks.faults import ANSWER_FAULTS, CODEC_FAULTS, LAQ_BITS_FAULT
from fedlayer.methods.base import LayerwiseStrategy
from fedlayer.methods.fedlama import FedLAMAStrategy


#: What each reply-contract fault (issue 24, items 3 and 4) must be refused for.
CONTRACT_REASONS = {
    "stale": "which is no train message of round 2",
    "future": "which is no train message of round 1",
    "other-node": "answers the train message sent to node 101,",
    "evaluate-reply": "a 'evaluate' reply offered as a 'train' reply",
    "query-reply": "a 'query' reply offered as a 'train' reply",
    "codec-2-bits": "codec: reply encoded at 2 bits",
    "codec-8-bits": "codec: reply encoded at 8 bits",
    "codec-16-bits": "codec: reply encoded at 16 bits",
    "codec-dense": "dense (32 bits), configured up_bits=4",
    "codec-version": "codec: reply names reference version 2, the server has version 1 pending",
    "laq:bits-8": "LAQ update encoded at 8 bits",
}


@pytest.mark.parametrize("name", ["fedlama", "laq"])
def test_every_fault_is_refused_and_no_model_is_corrupted(name, tmp_path):
    cases = fault_matrix.run_matrix([name], tmp_path)
    assert [c.fault for c in cases] == fault_matrix.faults_of(name)
    assert {"duplicate", "huge", "scaled", "mislabelled", "nan", "corrupt-bytes", "sole-huge", "sole-scaled"} <= {
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
        assert case.lone_changed == "", case  # the faulty reply alone: refused, and nothing changed
    if (
        name == "fedlama"
    ):  # a refused client is sent every layer next time: noted, not counted as corruption
        assert "resend: [4]" in next(c for c in cases if c.fault == "nan").refusal_state
    contract = {c.fault: c.reason for c in cases if c.fault in CONTRACT_REASONS}
    assert set(contract) == {*ANSWER_FAULTS, *([LAQ_BITS_FAULT] if name == "laq" else CODEC_FAULTS)}
    for fault, reason in contract.items():  # refused for what they break, not for some later check
        assert CONTRACT_REASONS[fault] in reason, (fault, reason)


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


@pytest.mark.parametrize("fault", ["sole-carrier-huge", "sole-carrier-scaled"])
def test_a_fedlp_layer_one_node_carries_is_bounded_too(fault, tmp_path):
    assert fault in fault_matrix.faults_of("fedlp") and fault not in fault_matrix.faults_of("fedavg")
    case = fault_matrix.run_case("fedlp", fault, tmp_path)
    assert case.rejected == 1 and "no other reply carries it" in case.reason, case
    assert not case.corrupted and case.lone_changed == "", case


def test_a_refused_round_that_changes_state_is_reported(tmp_path, monkeypatch):
    """With the guard passing everything and no rollback, a lone 3e38 reply is averaged into
    FedLAMA's discrepancies before its round is dropped: the column must say so."""
    monkeypatch.setattr(LayerwiseStrategy, "guard_update_norms", lambda self, server_round, replies: replies)
    monkeypatch.setattr(FedLAMAStrategy, "load_state_dict", lambda self, state: None)
    case = fault_matrix.run_case("fedlama", "sole-huge", tmp_path)
    assert "discrepancy" in case.lone_changed, case
    report = fault_matrix.table([case])
    assert "| sole-huge | 1: fedlama | 0/1 rejected | 1 | 1 |" in report and "Cases that missed the goal" in report
