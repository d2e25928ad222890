"""The warm worker (issue 27): the same results as the cold path, a cold fallback, and what it refuses.

Real worker processes (started by ``WorkerSupervisor``, as ``fedlayer-client``
starts them) serve the real forwarding ClientApp; the server side is the real
round loop over ``InProcessGrid``. The cold baseline is fedlayer's ClientApp
called in this process with the same run config.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.serde import context_from_proto, context_to_proto, message_to_proto

from fedlayer.client.app import make_client_app
from fedlayer.client.warm.forward import app as forwarding_app
from fedlayer.client.warm.forward import forward
from fedlayer.client.warm.protocol import (
    DIGEST_CACHE,
    FOLDER,
    MAX_FRAME,
    RACY_SECONDS,
    SOCKET,
    FrameTooLarge,
    PeerRefused,
    check_peer,
    code_digest,
    connect,
    hello,
    recv_frame,
    recv_json,
    send_frame,
    send_json,
    socket_folder,
)
from fedlayer.client.warm.supervise import WorkerSupervisor
from fedlayer.client.warm.worker import CANCELLED, Worker, session_key
from fedlayer.config import compose_config, run_config_to_overrides
from fedlayer.layers import from_arrayrecord
from fedlayer.methods import METHODS
from fedlayer.models.kept import KeptModel
from fedlayer.server.loop import FederatedRun
from tests.fingerprints import CASES, COMMON, NUM_CLIENTS
from tests.inprocess import InProcessGrid, wire_copy

REPO = Path(__file__).resolve().parents[1]
#: One case per method (tests/fingerprints.py)
METHOD_CASES = ["fedavg", "fedlama", "fedlp-homogeneous", "laq-gradient", "pfedla", "fll", "local"]


class Node:
    """A state folder with a supervised worker, and its log."""

    def __init__(self, state: Path, log: Path, cwd: Path | None = None, pythonpath: Path | None = None) -> None:
        self.state, self.log = state, log
        self.socket = socket_folder(state) / SOCKET
        code_digest()  # this process's side of the handshake, read from disk next to the worker's
        self.supervisor = WorkerSupervisor(state, restart_delay_s=0.2, log=log)
        if pythonpath is not None:  # a worker running another copy of fedlayer
            self.supervisor.command = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(pythonpath)!r}); "
                                       "from fedlayer.client.warm.worker import main; main()", *self.supervisor.command[3:]]
        self.supervisor.start()
        self.wait_ready(1)

    def wait_ready(self, starts: int, timeout: float = 180.0) -> None:
        """Until the ``starts``-th worker listens."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log_text().count("ready on") >= starts:
                return
            time.sleep(0.1)
        raise AssertionError(f"the worker did not come up:\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def served(self) -> int:
        return self.log_text().count("served ")


@pytest.fixture(scope="module")
def node(tmp_path_factory) -> Node:
    folder = tmp_path_factory.mktemp("warm")
    made = Node(folder / "state", folder / "worker.log")
    yield made
    made.supervisor.stop()


def run_config(case: str, output_dir: Path, extra: list[str] = ()) -> dict[str, str]:
    return {"overrides": " ".join([*COMMON, *CASES[case], *extra, f"output_dir={output_dir}", f"run_name={case}"])}


def run_with(app: ClientApp, config: dict[str, str], state_dir: Path, run_id: int = 1, hook=None) -> dict[str, Any]:
    """A whole run over ``app``; the final model, the ledger and the round records (without timings).

    The node's state files start empty, as for a new node: they are keyed by
    node, not by run (a resumed run is a new run to Flower and must find
    them), so a node left out of a run's first round would otherwise restore
    an earlier run's file, cold or warm alike.
    """
    for kept in state_dir.glob("*") if state_dir.exists() else []:
        if kept.name != FOLDER:
            shutil.rmtree(kept) if kept.is_dir() else kept.unlink()
    run = FederatedRun(compose_config(run_config_to_overrides(config)))
    serve = app if hook is None else (lambda message, context: hook(message) or app(message, context))
    grid = InProcessGrid(serve, NUM_CLIENTS, run_config=config, node_config=lambda p: {
        "partition-id": p, "num-partitions": NUM_CLIENTS, "host": "in-process", "state-dir": str(state_dir)})
    for context in grid.contexts.values():
        context.run_id = run_id
    summary = run.run(grid)
    assert summary["rejected_replies"] == 0
    records = [{k: v for k, v in r.items() if k != "seconds"} for r in run.rundir.read_metrics()]
    return {"state": run.strategy.global_state, "ledger": run.ledger.totals(), "records": records}


def assert_same(warm: dict[str, Any], cold: dict[str, Any]) -> None:
    assert warm["ledger"] == cold["ledger"]
    assert json.dumps(warm["records"], sort_keys=True) == json.dumps(cold["records"], sort_keys=True)
    assert warm["state"].keys() == cold["state"].keys()
    for name in cold["state"]:  # bitwise: the same machine, the same code
        assert np.array_equal(warm["state"][name], cold["state"][name]), name


# ---------------------------------------------------------------- same results
def test_every_method_is_covered():
    assert {CASES[c][0].split("=")[1] for c in METHOD_CASES} == set(METHODS)


@pytest.mark.parametrize("case", METHOD_CASES)
def test_warm_and_cold_give_bitwise_the_same_models_and_ledgers(case, node, tmp_path):
    served, kept = node.served(), node.log_text().count("(kept model)")
    warm = run_with(forwarding_app, run_config(case, tmp_path / "warm"), node.state)
    assert node.served() > served  # the worker answered
    assert node.log_text().count("(kept model)") > kept  # and loaded a later message into the model it kept
    cold = run_with(make_client_app(), run_config(case, tmp_path / "cold"), tmp_path / "cold-state")
    assert not socket_folder(tmp_path / "cold-state").exists()
    assert_same(warm, cold)


def test_the_worker_serves_two_runs_one_after_the_other_without_mixing_them(node, tmp_path):
    """Run 7 and run 8 differ in seed (data split, initial model) and model; each equals its cold run."""
    extra = {7: [], 8: ["seed=5", "model=linear"]}
    warm = {run_id: run_with(forwarding_app, run_config("fedavg", tmp_path / f"warm-{run_id}", more), node.state, run_id)
            for run_id, more in extra.items()}
    for run_id, more in extra.items():
        cold = run_with(make_client_app(), run_config("fedavg", tmp_path / f"cold-{run_id}", more), tmp_path / f"cold-state-{run_id}", run_id)
        assert_same(warm[run_id], cold)
    assert "run 7: new session" in node.log_text() and "run 8: new session" in node.log_text()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_the_worker_trains_on_cuda_like_the_cold_path(node, tmp_path):
    """On CUDA the worker keeps its context between messages; cuDNN kernels may differ in the last bits."""
    served = node.served()
    warm = run_with(forwarding_app, run_config("fedavg", tmp_path / "warm", ["device=cuda"]), node.state)
    cold = run_with(make_client_app(), run_config("fedavg", tmp_path / "cold", ["device=cuda"]), tmp_path / "cold-state")
    assert node.served() > served and warm["ledger"] == cold["ledger"]
    for name, value in cold["state"].items():
        assert np.allclose(warm["state"][name], value, rtol=1e-4, atol=1e-5), name


# ---------------------------------------------------------------- the kept model
class InProcessWorker:
    """A worker whose calls run in this process, as its connection handler runs them, so a
    test can look at its sessions; every train reply's arrays and the session's model after it."""

    def __init__(self, state_dir: Path) -> None:
        self.worker = Worker(state_dir)
        self.conn, self._peer = socket.socketpair()  # the forwarding side stays connected: no cancellation
        self.kept: dict[tuple[int, str], list[tuple[torch.nn.Module, int]]] = {}
        self.replies: dict[tuple[int, int], dict[str, np.ndarray]] = {}

    def __call__(self, message: Message, context: Context) -> Message:
        from flwr.supercore.task_identity import TaskIdentity

        server_side = TaskIdentity.run_id, TaskIdentity.node_id
        try:
            reply = self.worker.call(message, context, self.conn)
        finally:  # the call sets the task identity for its process; here the server's messages take it too
            TaskIdentity.run_id, TaskIdentity.node_id = server_side
        assert isinstance(reply, Message), reply
        if message.metadata.message_type == "train":
            model = self.worker.sessions[session_key(context)].kept.model
            self.kept.setdefault(session_key(context), []).append((model, next(model.parameters()).data_ptr()))
            self.replies[train_message_id(message, context)] = reply_arrays(reply)
        return reply

    def close(self) -> None:
        self.conn.close()
        self._peer.close()


def train_message_id(message: Message, context: Context) -> tuple[int, int]:
    return int(message.content["config"]["server-round"]), int(context.node_config["partition-id"])


def reply_arrays(reply: Message) -> dict[str, np.ndarray]:
    """The tensors a reply carries (a FedLP node that dropped every layer sends none)."""
    return from_arrayrecord(reply.content["arrays"]) if "arrays" in reply.content else {}


def cold_replies(replies: dict[tuple[int, int], dict[str, np.ndarray]]) -> ClientApp:
    """fedlayer's ClientApp, recording every train reply's arrays into ``replies``."""
    app = make_client_app()

    def serve(message: Message, context: Context) -> Message:
        reply = app(message, context)
        if message.metadata.message_type == "train":
            replies[train_message_id(message, context)] = reply_arrays(reply)
        return reply

    return serve


@pytest.fixture
def in_process(tmp_path) -> InProcessWorker:
    made = InProcessWorker(tmp_path / "in-process-state")
    yield made
    made.close()


#: Every node trains in both rounds, so each session serves two train messages (and evaluations).
TWO_ROUNDS = ["federation.rounds=2", "federation.fraction_train=1.0", "federation.fraction_evaluate=1.0"]


@pytest.mark.parametrize("case, extra", [
    ("fedavg", []),
    ("fedlp-homogeneous", ["strategy.freeze_dropped=true"]),  # requires_grad changed per round, reset as built
    ("fedlp-heterogeneous", []),  # depth sub-models and level heads on the kept model
    ("pfedla", []),  # personal layers merged in from the node's own kept state
    ("fll", []),  # a kept staged model: stage 0 then stage 1, frozen blocks, the initial state kept with it
])
def test_a_session_loads_each_message_into_one_kept_model_and_answers_bitwise_as_cold(case, extra, in_process, tmp_path):
    config = run_config(case, tmp_path / "warm", [*TWO_ROUNDS, *extra])
    warm = run_with(in_process, config, tmp_path / "warm-state")
    cold_train: dict[tuple[int, int], dict[str, np.ndarray]] = {}
    cold = run_with(cold_replies(cold_train), run_config(case, tmp_path / "cold", [*TWO_ROUNDS, *extra]), tmp_path / "cold-state")
    assert_same(warm, cold)
    assert in_process.replies.keys() == cold_train.keys() and len(cold_train) == 2 * NUM_CLIENTS
    for message, arrays in cold_train.items():  # every train reply, bitwise
        assert in_process.replies[message].keys() == arrays.keys()
        assert all(np.array_equal(in_process.replies[message][k], v) for k, v in arrays.items()), message
    assert len(in_process.kept) == NUM_CLIENTS  # one session per node
    for (first, pointer), (second, again) in in_process.kept.values():
        assert second is first and again == pointer  # the same module, its parameters in the same storage
    assert all(session.kept.builds == 1 for session in in_process.worker.sessions.values())


def test_two_runs_of_one_worker_keep_separate_models(in_process, tmp_path):
    """Run 7 (cnn) and run 8 (linear, another seed), one node each: two sessions, two models, no storage shared."""
    one_round = ["federation.rounds=1", "federation.fraction_train=1.0"]
    extra = {7: one_round, 8: [*one_round, "seed=5", "model=linear"]}
    for run_id, more in extra.items():
        warm = run_with(in_process, run_config("fedavg", tmp_path / f"warm-{run_id}", more), tmp_path / "warm-state", run_id)
        cold = run_with(make_client_app(), run_config("fedavg", tmp_path / f"cold-{run_id}", more), tmp_path / f"cold-{run_id}", run_id)
        assert_same(warm, cold)
    models = {run_id: [seen[0][0] for key, seen in in_process.kept.items() if key[0] == run_id] for run_id in extra}
    assert {run_id: [type(m).__name__ for m in kept] for run_id, kept in models.items()} == {
        7: ["CNN"] * NUM_CLIENTS, 8: ["LinearModel"] * NUM_CLIENTS}  # a session (and a model) per run and node
    pointers = [{t.data_ptr() for t in model.state_dict().values()} for kept in models.values() for model in kept]
    assert sum(map(len, pointers)) == len(set().union(*pointers))  # no tensor storage shared by two sessions


def test_a_kept_model_is_reset_as_built_and_rebuilt_for_another_structure():
    kept, device = KeptModel(), torch.device("cpu")
    built = lambda: torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)).eval()  # noqa: E731
    model = kept.take(("a",), built, device, initial=True)
    initial = kept.initial_state()
    model.train()
    model[0].weight.requires_grad_(False)
    model[1](model[0](torch.ones(4, 3))).sum().backward()  # gradients, new BatchNorm statistics
    assert model[0].bias.grad is not None
    again = kept.take(("a",), built, device, initial=True)
    assert again is model and kept.builds == 1
    assert not any(m.training for m in again.modules()) and all(p.requires_grad and p.grad is None for p in again.parameters())
    assert np.array_equal(kept.initial_state()["1.running_mean"], initial["1.running_mean"])  # the state as built
    with pytest.raises(ValueError):
        kept.initial_state()["1.running_mean"][0] = 1.0  # read-only: no handler changes it for the next message
    other = kept.take(("b",), built, device)
    assert other is not model and kept.builds == 2 and kept.model is other  # one model per session
    other.add_module("extra", torch.nn.Linear(2, 2))  # no longer as built: built again
    assert kept.take(("b",), built, device) is not other and kept.builds == 3
    other = kept.model
    with pytest.raises(RuntimeError, match="size mismatch"):
        kept.load(other, {"0.weight": torch.zeros(5, 5)})
    assert kept.model is None  # a half-loaded model is not handed out again


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_on_cuda_the_kept_model_stays_on_the_device_between_messages(in_process, tmp_path):
    """Each node's two train messages load into one model whose tensors never leave the GPU."""
    extra = [*TWO_ROUNDS, "device=cuda"]
    warm = run_with(in_process, run_config("fedavg", tmp_path / "warm", extra), tmp_path / "warm-state")
    assert len(in_process.kept) == NUM_CLIENTS
    for (first, pointer), (second, again) in in_process.kept.values():
        assert second is first and again == pointer
        assert all(t.is_cuda for t in first.state_dict().values())
    assert all(session.kept.builds == 1 for session in in_process.worker.sessions.values())
    cold = run_with(make_client_app(), run_config("fedavg", tmp_path / "cold", extra), tmp_path / "cold-state")
    assert warm["ledger"] == cold["ledger"]
    for name, value in cold["state"].items():  # cuDNN may pick other kernels in another process
        assert np.allclose(warm["state"][name], value, rtol=1e-4, atol=1e-5), name


# ---------------------------------------------------------------- falling back to cold
def test_killing_the_worker_mid_run_loses_no_round_and_it_serves_again_after_its_restart(tmp_path):
    node = Node(tmp_path / "state", tmp_path / "worker.log")
    try:
        extra = ["federation.rounds=4", "federation.fraction_train=1.0"]
        served_at_round: dict[int, int] = {}

        def hook(message: Message) -> None:
            if message.metadata.message_type != "train":
                return
            server_round = int(message.content["config"]["server-round"])
            if server_round not in served_at_round:
                served_at_round[server_round] = node.served()
                if server_round == 2:  # SIGKILL while it serves (or just before): the node goes on cold
                    pid = node.supervisor.pid
                    threading.Timer(0.05, os.kill, (pid, signal.SIGKILL)).start()
                if server_round == 3:
                    node.wait_ready(2)

        warm = run_with(forwarding_app, run_config("fedavg", tmp_path / "warm", extra), node.state, hook=hook)
        cold = run_with(make_client_app(), run_config("fedavg", tmp_path / "cold", extra), tmp_path / "cold-state")
        assert_same(warm, cold)
        assert all(r["replies"] == NUM_CLIENTS and r["error_replies"] == 0 for r in warm["records"])
        assert node.supervisor.starts == 2 and "the warm worker ended (status -9)" in node.log_text()
        after_restart = node.log_text().split("ready on")[2]
        assert after_restart.count("served train") >= NUM_CLIENTS  # rounds 3 and 4 warm again
        assert served_at_round[3] - served_at_round[2] < NUM_CLIENTS  # round 2 ran (partly) cold
    finally:
        node.supervisor.stop()


def test_a_call_whose_clientapp_process_goes_away_is_cancelled_and_the_worker_restarts(tmp_path):
    node = Node(tmp_path / "state", tmp_path / "worker.log")
    try:
        captured: list[tuple[Message, Context]] = []

        def capture(message: Message, context: Context) -> Message:
            if message.metadata.message_type == "train" and not captured:
                captured.append((wire_copy(message), context_from_proto(context_to_proto(context))))
            return forwarding_app(message, context)

        run_with(capture, run_config("fedavg", tmp_path / "run", ["federation.rounds=1", "model=linear"]), node.state)
        message, context = captured[0]
        context.run_config = {"overrides": context.run_config["overrides"] + " train.local_steps=100000"}  # a long call
        with connect(node.socket, 10.0) as sock:  # a forwarding process that dies once its message is accepted
            send_json(sock, hello())
            recv_json(sock)
            send_frame(sock, message_to_proto(message).SerializeToString())
            send_frame(sock, context_to_proto(context).SerializeToString())
            deadline = recv_json(sock)["deadline"]
            assert 0 < deadline <= 0.9 * 600  # below federation.round_timeout (600 s by default)
            time.sleep(1.0)
        node.wait_ready(2)
        assert "went away mid-call: cancelling" in node.log_text()
        assert f"the warm worker ended (status {CANCELLED})" in node.log_text()
    finally:
        node.supervisor.stop()


def query(node_config: dict[str, Any]) -> tuple[Message, Context]:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id = 1, 1
    message = Message(RecordDict(), dst_node_id=1, message_type="query")
    context = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})
    return message, context


def test_the_forwarding_clientapp_imports_neither_torch_nor_fedlayers_methods():
    code = ("import sys, fedlayer.client.warm.forward; "
            "print(sorted(m for m in ('torch', 'fedlayer.client.app', 'fedlayer.methods') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"


def test_a_worker_running_other_code_is_not_used(tmp_path, node):
    copy = tmp_path / "copy"
    shutil.copytree(REPO / "fedlayer", copy / "fedlayer", ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / "fedlayer" / "client" / "warm" / "__init__.py", "a") as changed:
        changed.write("# another version\n")
    copied_at = time.time()
    other = Node(tmp_path / "state", tmp_path / "worker.log", pythonpath=copy)
    try:
        assert other.supervisor.pid is not None
        message, context = query({"partition-id": 0, "num-partitions": 2, "state-dir": str(other.state)})
        assert forward(message, context) is None  # the cold path answers
        assert "refused a request for other code" in other.log_text() and other.served() == 0
        reply = forwarding_app(message, context)
        assert not reply.has_error() and int(reply.content["metrics"]["partition-id"]) == 0
        # the same message, to this code's worker, is served warm
        message, context = query({"partition-id": 0, "num-partitions": 2, "state-dir": str(node.state)})
        served = node.served()
        assert forward(message, context) is not None and node.served() == served + 1
        # a forwarder running the copy (as from a FAB) is served warm, its digest kept; once one of its files
        # changes (same size, mtime set back), the kept digest is not used: the worker refuses, the message runs cold
        time.sleep(max(0.0, RACY_SECONDS - (time.time() - copied_at)))
        done = subprocess.run([sys.executable, "-c", FORWARD_FROM_COPY.format(copy=str(copy), state=str(other.state))],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["warm", "kept", "cold"], done.stdout + done.stderr
        assert other.served() == 1 and other.log_text().count("refused a request for other code") == 3  # 2 above
    finally:
        other.supervisor.stop()


#: Run by ``test_a_worker_running_other_code_is_not_used`` with the copy first on ``sys.path``.
FORWARD_FROM_COPY = """
import json, os, sys
sys.path.insert(0, {copy!r})
from pathlib import Path
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from fedlayer.client.warm import protocol
from fedlayer.client.warm.forward import forward
assert protocol.__file__.startswith({copy!r}), protocol.__file__

def ask():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    message = Message(RecordDict(), dst_node_id=1, message_type="query")
    node_config = {{"partition-id": 0, "num-partitions": 2, "state-dir": {state!r}}}
    context = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={{}})
    return "warm" if forward(message, context) is not None else "cold"

print(ask())
kept = json.loads((Path({state!r}) / protocol.FOLDER / protocol.DIGEST_CACHE).read_text())
print("kept" if str(Path({copy!r}).resolve() / "fedlayer") in kept else "not kept")
changed = Path({copy!r}) / "fedlayer" / "client" / "warm" / "__init__.py"
before = changed.stat()
changed.write_bytes(changed.read_bytes().replace(b"another version", b"anOther version"))
os.utime(changed, ns=(before.st_atime_ns, before.st_mtime_ns))
assert changed.stat().st_size == before.st_size and changed.stat().st_mtime_ns == before.st_mtime_ns
print(ask())
"""


def load_protocol(copy: Path) -> Any:
    """The ``protocol`` module of a copy of fedlayer, loaded from its file (as a FAB's forwarder loads it)."""
    spec = importlib.util.spec_from_file_location("copied_protocol", copy / "fedlayer" / "client" / "warm" / "protocol.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_forwarders_kept_code_digest_follows_every_change(tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(REPO / "fedlayer", copy / "fedlayer", ignore=shutil.ignore_patterns("__pycache__"))
    package, folder = (copy / "fedlayer").resolve(), tmp_path / "warm"
    folder.mkdir(mode=0o700)
    copied = load_protocol(copy)
    time.sleep(RACY_SECONDS + 0.1)  # sources younger than that are hashed every time, never kept
    assert copied.cached_code_digest(folder) == copied.code_digest()
    kept = folder / DIGEST_CACHE
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600 and json.loads(kept.read_text())[str(package)]["code"] == copied.code_digest()

    def keep(code: str) -> None:  # a kept digest for the sources as they are now
        fingerprint = copied._stat_fingerprint(copied._sources(package))[0]
        kept.write_text(json.dumps({str(package): {"stat": fingerprint, "code": code}}))

    keep("kept")
    assert copied.cached_code_digest(folder) == "kept"  # nothing changed: the kept digest is used, nothing hashed
    changed = package / "client" / "warm" / "__init__.py"
    before = changed.stat()
    changed.write_bytes(changed.read_bytes().replace(b"A warm", b"a warm"))
    os.utime(changed, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (changed.stat().st_size, changed.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    edited = copied.code_digest.__wrapped__()  # the copy's sources hashed again
    assert edited != copied.code_digest() and copied.cached_code_digest(folder) == edited
    assert json.loads(kept.read_text())[str(package)]["code"] == "kept"  # a file this young: not kept
    (package / "extra.py").write_text("")
    assert copied.cached_code_digest(folder) == copied.code_digest.__wrapped__() != edited
    keep("kept")
    folder.chmod(0o755)  # a folder others can read or write is not trusted
    assert copied.cached_code_digest(folder) == copied.code_digest.__wrapped__()


def test_no_state_dir_or_no_worker_runs_cold(tmp_path):
    for node_config in ({"partition-id": 0, "num-partitions": 2}, {"partition-id": 0, "num-partitions": 2, "state-dir": str(tmp_path)}):
        message, context = query(node_config)
        assert forward(message, context) is None
        assert not forwarding_app(message, context).has_error()


# ---------------------------------------------------------------- what it refuses
def test_a_frame_over_the_bound_is_refused_unread(node):
    with connect(node.socket, 10.0) as sock:
        send_json(sock, hello())
        assert recv_json(sock)["code"] == code_digest()
        sock.sendall(struct.pack(">Q", MAX_FRAME + 1))  # the Message frame's header
        sock.settimeout(10.0)
        assert sock.recv(1) == b""  # closed, nothing more read or answered
    assert f"peer announced a frame of {MAX_FRAME + 1} bytes" in node.log_text()
    left, right = socket.socketpair()
    with left, right:
        left.sendall(struct.pack(">Q", 70_000))
        with pytest.raises(FrameTooLarge):
            recv_frame(right, limit=65_536)
    message, context = query({"partition-id": 1, "num-partitions": 2, "state-dir": str(node.state)})
    assert forward(message, context) is not None  # the worker serves on


def test_a_peer_of_another_uid_is_refused():
    left, right = socket.socketpair()
    with left, right:
        check_peer(left, os.getuid())
        with pytest.raises(PeerRefused, match=f"uid {os.getuid()}, only uid {os.getuid() + 1}"):
            check_peer(left, os.getuid() + 1)


@pytest.mark.skipif(os.getuid() != 0, reason="connecting as another user needs root")
def test_the_worker_refuses_a_connection_from_another_uid(node):
    folder = node.socket.parent
    assert oct(folder.stat().st_mode & 0o777) == "0o700" and oct(node.socket.stat().st_mode & 0o777) == "0o600"
    folder.chmod(0o711)  # let the other user reach the socket: the uid check must still refuse it
    node.socket.chmod(0o666)
    try:
        pid = os.fork()
        if pid == 0:  # the child: become nobody, connect, expect no answer
            status = 2
            try:
                os.chdir(folder)
                os.setgid(65534)
                os.setuid(65534)
                with socket.socket(socket.AF_UNIX) as sock:
                    sock.settimeout(10.0)
                    sock.connect(SOCKET)
                    sock.sendall(struct.pack(">Q", 2) + b"{}")
                    status = 0 if sock.recv(1) == b"" else 1
            except (ConnectionResetError, BrokenPipeError):  # closed before or while the child wrote: refused too
                status = 0
            except BaseException as err:  # noqa: BLE001  (reported by the parent)
                os.write(2, f"the other user's client failed: {err!r}\n".encode())
            finally:
                os._exit(status)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        folder.chmod(0o700)
        node.socket.chmod(0o600)
    assert "peer runs as uid 65534, only uid 0 may use this worker" in node.log_text()


def test_fedlayer_client_and_the_compose_file_run_the_worker_unless_told_cold():
    import yaml

    from fedlayer.commands.deploy import client_parser

    node = ["--server", "superlink:9092", "--partition-id", "0", "--num-partitions", "2", "--insecure"]
    assert not client_parser().parse_args(node).cold and client_parser().parse_args([*node, "--cold"]).cold
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    nodes = [s for name, s in services.items() if name.startswith("supernode-")]
    assert nodes and all(s["command"] == ["fedlayer-client"] and s["environment"]["FEDLAYER_COLD"] == "0" for s in nodes)
