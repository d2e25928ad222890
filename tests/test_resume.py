"""A run whose server dies mid-run resumes to exactly the uninterrupted result.

For every strategy, including the stateful ones: the server's state comes back
from its checkpoint (FedLAMA's intervals and cohort, LAQ's sums, pFedLA's
versioned client files, FLL's stage), the clients' from their state folders
(``client_state_dir``), and sampling follows client ids, not node ids (the
resumed run's nodes get new ids). The matrix runs in process (the server
"dies" with an exception mid-round, after some clients trained); one case is
also run for real: ``fedlayer-sim`` killed with SIGKILL, then resumed.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedlayer.config import compose_config, resolve_resume
from fedlayer.layers import states_equal
from fedlayer.server.checkpoint import CheckpointStore
from fedlayer.server.rundir import RunDirectory
from tests.inprocess import FIRST_NODE_ID, SimulatedCrash, run_in_process

ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
ROUNDS = 4
NUM_CLIENTS = 4
#: What the engine's replies add to their host record: the Ray node id (56 hex digits) with its key
#: and record overhead (measured: 80 bytes a reply).
RAY_NODE_ID_BYTES = 96


def _common(strategy_overrides: list[str]) -> list[str]:
    return [
        "dataset=digits", "model=cnn", f"federation.num_clients={NUM_CLIENTS}", "federation.fraction_train=0.5",
        f"federation.rounds={ROUNDS}", "train.local_steps=5", "train.batch_size=16", *strategy_overrides,
    ]


#: (strategy overrides, round after which the server dies)
CASES = {
    "fedavg": (["strategy=fedavg"], 2),
    # intervals are re-assigned at the end of round 2; round 4 needs the layers the clients kept in round 3
    "fedlama": (["strategy=fedlama", "strategy.phi=2", "strategy.min_round_to_adjust=0"], 3),
    "fedlp": (["strategy=fedlp", "strategy.scheme=heterogeneous"], 2),
    "laq": (["strategy=laq", "federation.fraction_train=1.0"], 2),
    "pfedla": (["strategy=pfedla"], 2),
    "fll": (["strategy=fll", "strategy.rounds_per_stage=1"], 2),
    # the codec's references (server) and references + residuals (clients) resume exactly
    "fedlama-codec": (["strategy=fedlama", "strategy.phi=2", "strategy.min_round_to_adjust=0",
                       "codec.up_bits=4", "codec.down_bits=8"], 3),
}


def _final_checkpoint(run_dir: Path):
    checkpoint = CheckpointStore(run_dir).latest()
    assert checkpoint is not None and checkpoint.round == ROUNDS
    return checkpoint


def assert_same_run(straight_dir: Path, resumed_dir: Path, slack_per_message: int = 0) -> None:
    """Same final model, same traffic per round (up to node-id varints, and ``slack_per_message``
    bytes a message where one run ran in the engine and the other in process), no round lost or doubled."""
    straight, resumed = _final_checkpoint(straight_dir), _final_checkpoint(resumed_dir)
    assert states_equal(straight.global_state, resumed.global_state)
    # Byte counts may differ by a few bytes per message: node ids differ between
    # runs and their varint encoding in the message metadata may vary in length.
    # The resumed run also asks its new nodes who they are (control bytes).
    for round_, traffic in straight.ledger_state.items():
        other = resumed.ledger_state[round_]
        assert traffic["messages_down"] == other["messages_down"] and traffic["messages_up"] == other["messages_up"]
        for key in ("bytes_down", "bytes_up"):
            direction = key.split("_")[1]
            payload = traffic[key] - traffic[f"control_bytes_{direction}"]
            tolerance = (16 + slack_per_message) * traffic["messages_down"]
            assert abs(payload - (other[key] - other[f"control_bytes_{direction}"])) <= tolerance, key
    assert [r["round"] for r in RunDirectory(resumed_dir).read_metrics()] == list(range(1, ROUNDS + 1))


@pytest.mark.parametrize("case", list(CASES))
def test_crash_mid_round_then_resume_matches_uninterrupted_run(tmp_path, case):
    strategy_overrides, crash_after = CASES[case]
    common = [*_common(strategy_overrides), f"output_dir={tmp_path}", f"client_state_dir={tmp_path / 'state-straight'}"]
    run_in_process(compose_config([*common, "run_name=straight"]))

    crashed = [*common[:-1], f"client_state_dir={tmp_path / 'state-crashed'}", "run_name=crashed"]
    with pytest.raises(SimulatedCrash):  # one client trains in the round the server never finishes
        run_in_process(compose_config(crashed), crash_at=(crash_after + 1, 1))
    assert not (tmp_path / "crashed" / "summary.json").exists()
    key = RunDirectory(tmp_path / "crashed").run_key
    resumed = resolve_resume(compose_config([f"resume={tmp_path / 'crashed'}"]))
    run_in_process(resumed, first_node_id=FIRST_NODE_ID + 1000)  # a new run: new node ids
    assert_same_run(tmp_path / "straight", tmp_path / "crashed")
    # the resumed run kept the run key, so its clients found their state in the same run folder
    assert RunDirectory(tmp_path / "crashed").run_key == key
    assert [p.name for p in (tmp_path / "state-crashed").glob("run-*")] == [f"run-{key}"]


def _command(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "fedlayer.commands.sim", *overrides]


@pytest.mark.slow
@pytest.mark.engine
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    strategy_overrides, kill_after = CASES["fedlama"]
    common = [*_common(strategy_overrides), f"output_dir={tmp_path}"]
    # The uninterrupted run in process: the engine trains bitwise the same models; its replies
    # only add the Ray node id to their host record, so traffic is compared with that slack.
    run_in_process(compose_config([*common, "run_name=straight", f"client_state_dir={tmp_path / 'state-straight'}"]))
    process = subprocess.Popen(
        _command(*common, "run_name=crashed"), env=ENV, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    target = tmp_path / "crashed" / "checkpoints" / f"round-{kill_after:06d}.ckpt"
    deadline = time.monotonic() + 300
    try:
        while not target.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert target.exists(), "the run never reached the kill point"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    assert not (tmp_path / "crashed" / "summary.json").exists()
    subprocess.run(_command(f"resume={tmp_path / 'crashed'}"), env=ENV, check=True, capture_output=True, timeout=600)
    assert_same_run(tmp_path / "straight", tmp_path / "crashed", slack_per_message=RAY_NODE_ID_BYTES)


def test_resume_is_exact_when_the_crash_also_lost_the_newest_checkpoint(tmp_path):
    """The checkpoint of round k is written while round k+1 runs: a crash then may leave only round k-1's.
    The resumed run repeats round k from there and still matches (clients keep their 3 newest round states)."""
    strategy_overrides, crash_after = CASES["laq"]  # every client trains every round and keeps state
    common = [*_common(strategy_overrides), f"output_dir={tmp_path}", f"client_state_dir={tmp_path / 'state-straight'}"]
    run_in_process(compose_config([*common, "run_name=straight"]))

    crashed = [*common[:-1], f"client_state_dir={tmp_path / 'state-crashed'}", "run_name=crashed"]
    with pytest.raises(SimulatedCrash):
        run_in_process(compose_config(crashed), crash_at=(crash_after + 1, 1))
    checkpoints = tmp_path / "crashed" / "checkpoints"
    (checkpoints / f"round-{crash_after:06d}.ckpt").unlink()  # its write had not landed
    assert CheckpointStore(tmp_path / "crashed").latest().round == crash_after - 1
    resumed = resolve_resume(compose_config([f"resume={tmp_path / 'crashed'}"]))
    run_in_process(resumed, first_node_id=FIRST_NODE_ID + 1000)
    assert_same_run(tmp_path / "straight", tmp_path / "crashed")


def test_resuming_a_checkpoint_without_the_methods_state_fields_stops_with_one_line(tmp_path):
    """A checkpoint written by a fedlayer whose state dataclass lacked a field is refused by name, not a KeyError."""
    from fedlayer.server.loop import RunStopped

    run_in_process(compose_config([*_common(["strategy=fedavg", "federation.rounds=1"]), f"output_dir={tmp_path}", "run_name=old"]))
    store = CheckpointStore(tmp_path / "old")
    checkpoint = store.latest()
    del checkpoint.strategy_state["norm_history"]
    store.save(checkpoint)
    store.wait()
    with pytest.raises(RunStopped, match=r"lacks the method's state \(StrategyState: 'norm_history' missing"):
        run_in_process(resolve_resume(compose_config([f"resume={tmp_path / 'old'}", "federation.rounds=2"])))
