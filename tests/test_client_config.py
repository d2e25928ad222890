"""Clients run without Hydra: the configuration is composed and validated once, by the server."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fedlayer.client.app import make_client_app
from fedlayer.config import compose_config, group_options, load_config
from fedlayer.server.loop import FederatedRun
from tests.inprocess import InProcessGrid

OVERRIDE_SETS = [
    [],
    [
        "dataset=animal10k", "model=cnn6", "federation.rounds=5", "train.local_steps=4", "seed=3",
        "dataset.image_size=32", "dataset.partition.scheme=dirichlet", "dataset.partition.alpha=0.1",
        "federation.min_available_nodes=2", "train.optimizer=adam", "output_dir=/tmp/x y",
    ],
]
#: Each strategy's own fields, overridden too.
STRATEGY_OVERRIDES = {
    "fedlp": ["strategy.layer_p=['head.fc1=0.0']", "strategy.scheme=heterogeneous", "strategy.level_preference=[0.5,0.5]"],
    "fedlama": ["strategy.phi=4"],
    "laq": ["strategy.mode=delta", "strategy.xi=0.0"],
    "fll": ["strategy.p_drop=0.5", "strategy.objective=contrastive"],
    "pfedla": ["strategy.k=1"],
}


@pytest.mark.parametrize("strategy", group_options("strategy"))
@pytest.mark.parametrize("overrides", OVERRIDE_SETS, ids=range(len(OVERRIDE_SETS)))
def test_client_config_equals_the_servers_key_by_key(strategy, overrides):
    chosen = [f"strategy={strategy}", *overrides, *STRATEGY_OVERRIDES.get(strategy, [])]
    server = OmegaConf.to_container(compose_config(chosen), resolve=True)
    client = OmegaConf.to_container(load_config(chosen), resolve=True)
    assert list(server) == list(client)
    for key in server:
        assert server[key] == client[key], key


def test_a_clientapp_call_never_composes_with_hydra(tmp_path, monkeypatch):
    run_config = {"strategy": "fedlama", "dataset": "digits", "model": "",
                  "overrides": f"federation.num_clients=2 train.local_steps=2 output_dir={tmp_path}"}
    from fedlayer.config import run_config_to_overrides

    run = FederatedRun(compose_config(run_config_to_overrides(run_config)))

    def refuse(*args, **kwargs):
        raise AssertionError("a ClientApp call composed the config with Hydra")

    monkeypatch.setattr("hydra.compose", refuse)
    monkeypatch.setattr("fedlayer.config.compose_config", refuse)
    grid = InProcessGrid(make_client_app(), 2, node_config=lambda p: {"partition-id": p, "num-partitions": 2},
                         run_config=run_config)
    summary = run.run(grid)
    assert summary["rejected_replies"] == 0 and summary["final_accuracy"] is not None
    assert all(r["replies"] == 2 for r in run.rundir.read_metrics())  # every client call succeeded


def test_the_clientapp_imports_no_hydra_plotting_or_server_code():
    heavy = ("hydra", "matplotlib", "sklearn", "scipy", "flwr_datasets", "datasets", "torch._dynamo", "fedlayer.server")
    code = f"import sys, fedlayer.client.app; print([m for m in {heavy!r} if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_a_node_keeps_its_split_and_a_fresh_process_reads_it_without_splitting(tmp_path):
    from fedlayer.workload import client_data

    cfg = compose_config(["dataset=digits", "federation.num_clients=3"])
    first = client_data(cfg, 2, 3, cache=tmp_path)
    assert len(list(tmp_path.glob("data-*.npz"))) == 1
    code = (
        "import sys\n"
        "from fedlayer.config import load_config\n"
        "from fedlayer.workload import client_data\n"
        f"train, test = client_data(load_config(['dataset=digits', 'federation.num_clients=3']), 2, 3, cache=__import__('pathlib').Path({str(tmp_path)!r}))\n"
        "print(len(train), len(test), int(train.y.sum()), [m for m in ('sklearn', 'flwr_datasets') if m in sys.modules])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == [str(len(first[0])), str(len(first[1])), str(int(first[0].y.sum())), "[]"]
    other = client_data(cfg, 1, 3, cache=tmp_path)  # another partition: another file, other data
    assert len(list(tmp_path.glob("data-*.npz"))) == 2 and int(other[0].y.sum()) != int(first[0].y.sum())


TRAIN_CALL = r"""
import json, sys
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from fedlayer.client.app import app
from fedlayer.layers import to_arrayrecord, torch_state_to_numpy
from fedlayer.models import build_model

def train_call(node_config, input_shape, num_classes):
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    state = torch_state_to_numpy(build_model("linear", input_shape=tuple(input_shape), num_classes=num_classes, seed=0).state_dict())
    before = set(sys.modules)
    context = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                      run_config={"strategy": "fedavg", "dataset": "digits", "model": "linear",
                                  "overrides": "federation.num_clients=2 train.local_steps=1"})
    config = ConfigRecord({"server-round": 1, "method": "fedavg", "request": sorted({k.rsplit(".", 1)[0] for k in state}), "keep-model": False})
    message = Message(RecordDict({"config": config, "arrays": to_arrayrecord(state)}), dst_node_id=7, message_type=MessageType.TRAIN)
    message.metadata.__dict__["_message_id"] = "m1"
    reply = app(message, context)
    assert not reply.has_error(), reply.error
    return sorted(m for m in ("sklearn", "flwr_datasets", "matplotlib", "scipy") if m in set(sys.modules) - before)
"""


def test_a_deployed_node_keeps_its_split_in_the_default_state_folder_and_the_next_message_reads_it(tmp_path, monkeypatch):
    """``fedlayer-client`` without ``--state-dir``: the first message's ClientApp splits, later ones (fresh processes) only read."""
    from flwr.common.config import parse_config_args

    from fedlayer.commands.deploy import client_command, client_parser
    from fedlayer.data import load_dataset

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for name in ("STATE_DIR", "DATA", "NODE_KEY", "CA_CERT"):
        monkeypatch.delenv(f"FEDLAYER_{name}", raising=False)
    command = client_command(client_parser().parse_args(
        ["--server", "127.0.0.1:9092", "--insecure", "--partition-id", "1", "--num-partitions", "2", "--device", "cpu"]))
    node_config = parse_config_args([command[command.index("--node-config") + 1]])
    assert node_config["state-dir"] == str(tmp_path / "cache" / "fedlayer" / "127.0.0.1_9092-partition-1-of-2")

    pool, _ = load_dataset("digits")

    def fresh_process_call() -> list[str]:
        code = TRAIN_CALL + f"print(json.dumps(train_call({node_config!r}, {list(pool.input_shape)!r}, {pool.num_classes})))"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    assert "sklearn" in fresh_process_call()  # the first message loads digits (sklearn), splits and keeps its part
    kept = list(Path(node_config["state-dir"]).glob("partition-00001/data-*.npz"))
    assert len(kept) == 1
    written = kept[0].stat().st_mtime_ns
    assert fresh_process_call() == []  # the next message's process reads it: no sklearn, nothing heavy
    assert kept[0].stat().st_mtime_ns == written and len(list(Path(node_config["state-dir"]).rglob("data-*.npz"))) == 1
