"""benchmarks.pfedla_report: the baselines' per-client spread is recomputed exactly from the run directory."""

import pytest

from benchmarks.pfedla_report import client_spreads, table
from fedlayer.config import compose_config
from tests.inprocess import run_in_process

COMMON = [
    "dataset=digits", "model=cnn", "federation.num_clients=3", "federation.fraction_train=1.0", "federation.rounds=3",
    "train.local_steps=3", "train.batch_size=16", "evaluation.max_examples=200",
    "dataset.partition.scheme=pathological", "dataset.partition.classes_per_client=4", "dataset.client_test_fraction=0.3",
]


@pytest.mark.slow
def test_baseline_spreads_reproduce_the_recorded_means(tmp_path):
    results = []
    for variant, overrides in (
        ("fedavg", ["strategy=fedavg", "federation.fraction_evaluate=1.0"]),
        ("local", ["strategy=local"]),
        ("pfedla", ["strategy=pfedla"]),
    ):
        cfg = compose_config([*COMMON, *overrides, f"output_dir={tmp_path}", f"run_name={variant}",
                              f"client_state_dir={tmp_path / variant / 'client-state'}"])
        _, summary = run_in_process(cfg)
        results.append({**summary, "variant": variant, "setting": "digits"})
    records = {r["variant"]: r for r in results}
    from fedlayer.server.rundir import RunDirectory

    last = {v: RunDirectory(tmp_path / v).read_metrics()[-1] for v in ("fedavg", "local")}
    fedavg = client_spreads(records["fedavg"])
    # the global model on every client's split, and every client's last round of training, exactly as recorded
    assert fedavg["global_on_clients"]["weighted"] == pytest.approx(last["fedavg"]["federated_evaluation"]["accuracy"], abs=1e-12)
    assert fedavg["after_training"]["weighted"] == pytest.approx(last["fedavg"]["train"]["local-test-accuracy"], abs=1e-12)
    local = client_spreads(records["local"])
    assert local["after_training"]["weighted"] == pytest.approx(last["local"]["train"]["local-test-accuracy"], abs=1e-12)
    assert local["after_training"]["clients"] == 3 and local["after_training"]["min"] <= local["after_training"]["max"]
    text = table(results, last=2)
    for method in ("| FedAvg |", "| FedAvg + FT |", "| local-only |", "| pfedla |"):
        row = next(line for line in text.splitlines() if method in line)
        assert " / " in row.split("|")[4], row  # every method has its spread over clients
