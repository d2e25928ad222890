"""Client-side halves of the methods, looked up by the ``method`` the server names.

A client method turns a received message into a reply. The standard one
serves every method whose client simply trains the model it has and returns
the layers asked for (FedAvg, FedLAMA, pFedLA, FedLP's homogeneous scheme);
methods with client-side logic of their own register another.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import ConfigRecord, Context, MetricRecord, RecordDict

from fedlayer.client.fll import fll_evaluate, fll_train
from fedlayer.client.fedlp import fedlp_train
from fedlayer.client.laq import laq_train
from fedlayer.client.runtime import ClientRuntime
from fedlayer.client.state import load_local_model, save_local_model
from fedlayer.client.training import evaluate, train_steps
from fedlayer.layers import State, from_arrayrecord, merge, select, to_arrayrecord, torch_state_to_numpy

ClientMethod = Callable[[ClientRuntime, RecordDict, Context], RecordDict]


def requested_layers(content: RecordDict) -> list[str]:
    """Layer names the server asked to get back."""
    return [name for name in content["config"].get("request", []) if name]


def current_state(runtime: ClientRuntime, content: RecordDict, context: Context) -> State:
    """The node's model for this round: what it kept, overwritten by what arrived."""
    local = load_local_model(context)
    if local is None:
        local = torch_state_to_numpy(runtime.new_model().state_dict())
    if "arrays" in content:
        local = merge(local, from_arrayrecord(content["arrays"]))
    return local


def reply_content(state: State, layers: list[str], runtime: ClientRuntime, metrics: dict[str, float]) -> RecordDict:
    """A reply with the requested layers and the metrics."""
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if layers:
        content["arrays"] = to_arrayrecord(select(state, runtime.layers, layers))
    return content


def standard_train(runtime: ClientRuntime, content: RecordDict, context: Context) -> RecordDict:
    """Train the whole model locally, keep it if the server says so, return the requested layers."""
    server_round = int(content["config"]["server-round"])
    model = runtime.model_with(current_state(runtime, content, context))
    metrics = train_steps(model, runtime.train_data, runtime.cfg.train, runtime.device, runtime.round_seed(server_round))
    state = torch_state_to_numpy(model.state_dict())
    if bool(content["config"].get("keep-model", True)):
        save_local_model(context, state)
    metrics.update(runtime.reply_metrics(model))
    return reply_content(state, requested_layers(content), runtime, metrics)


def standard_evaluate(runtime: ClientRuntime, content: RecordDict, context: Context) -> RecordDict:
    """Evaluate the received model on the client's test split."""
    model = runtime.model_with(current_state(runtime, content, context))
    result = evaluate(model, runtime.test_data, runtime.device)
    return RecordDict({"metrics": MetricRecord(result)})


#: method name -> (train handler, evaluate handler)
CLIENT_METHODS: dict[str, tuple[ClientMethod, ClientMethod]] = {
    "fedavg": (standard_train, standard_evaluate),
    "fedlp": (fedlp_train, standard_evaluate),
    "fll": (fll_train, fll_evaluate),
    "laq": (laq_train, standard_evaluate),
    "local": (standard_train, standard_evaluate),
    "pfedla": (standard_train, standard_evaluate),
    "fedlama": (standard_train, standard_evaluate),
}


def client_method(content: RecordDict, kind: str) -> ClientMethod:
    """The handler for the method named in the message's config."""
    config = content.config_records.get("config")
    if not isinstance(config, ConfigRecord) or "method" not in config:
        raise ValueError("message has no 'config' record naming a method")
    name = str(config["method"])
    if name not in CLIENT_METHODS:
        raise ValueError(f"unknown method {name!r}; this client knows {sorted(CLIENT_METHODS)}")
    train, evaluate_ = CLIENT_METHODS[name]
    return train if kind == "train" else evaluate_
