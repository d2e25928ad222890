"""The client half every method starts from: the runtime, the kept model, the standard handlers.

A client handler turns a received message's content into a reply. The
standard one serves every method whose client trains the model it has and
returns the layers asked for (FedAvg, pFedLA, local-only; FedLAMA's refuses
first when it has lost its kept model); methods with client logic of their
own (FedLP, LAQ, FLL) define theirs next to their strategy.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from omegaconf import DictConfig

from fedlayer.data import ArrayDataset
from fedlayer.layers import (
    ModelLayers,
    State,
    from_arrayrecord,
    merge,
    numpy_to_torch_state,
    select,
    to_arrayrecord,
    torch_state_to_numpy,
)
from fedlayer.models import LayeredModel
from fedlayer.models.kept import KeptModel, ModelT
from fedlayer.wire.messages import decode
from fedlayer.wire.records import (
    ARRAYS,
    CONFIG,
    METRICS,
    NUM_EXAMPLES,
    PARTITION_ID,
    RoundConfig,
)
from fedlayer.training import evaluate, train_steps
from fedlayer.workload import build_configured_model, client_data, initial_state

#: Record of ``context.state`` holding the node's model between rounds.
LOCAL_MODEL = "local-model"


@dataclass
class ClientRuntime:
    """The client's view of the run: the resolved config, its data, its device."""

    cfg: DictConfig
    partition_id: int
    num_partitions: int
    data_path: str | None
    device: torch.device
    #: a folder of this node where its data split is kept between processes
    data_cache: Path | None = None
    #: the warm worker's model for this run, kept between messages (None: each call builds its own)
    kept: KeptModel | None = None

    @cached_property
    def data(self) -> tuple[ArrayDataset, ArrayDataset]:
        """(train, test) data of this client."""
        return client_data(self.cfg, self.partition_id, self.num_partitions, self.data_path, self.data_cache)

    @property
    def train_data(self) -> ArrayDataset:
        return self.data[0]

    @property
    def test_data(self) -> ArrayDataset:
        return self.data[1]

    def new_model(self) -> LayeredModel:
        """A freshly initialised model (identical to the server's initial one)."""
        return build_configured_model(self.cfg, self.train_data)

    def model_with(self, state: State) -> LayeredModel:
        """A model loaded with a full numpy state, on the device: in a warm worker the run's
        kept model, loaded in place (``fedlayer.models.kept``), else a new one."""
        if self.kept is None:
            model = self.new_model()
            model.load_state_dict(numpy_to_torch_state(state))
            return model.to(self.device)
        model = self.kept.take(self.model_key(), self.new_model, self.device)
        self.load(model, state)
        return model

    def model_key(self) -> tuple[Hashable, ...]:
        """What the configured model's structure follows from (its initial values do not
        matter to a model that is loaded in full before use)."""
        data = self.train_data
        return (str(self.cfg.model.name), tuple(data.input_shape), int(data.num_classes))

    def built(self, key: Hashable, build: Callable[[], ModelT]) -> tuple[ModelT, Callable[[], State]]:
        """``build()`` and a function giving the state it was built with; in a warm worker the
        run's kept model under ``key`` (which with ``model_key`` names its structure), reset to
        its modes and flags as built and on the device, with the state it was built with.

        The state function of a new model reads the model: call it before changing it.
        """
        if self.kept is None:
            model = build()
            return model, lambda: torch_state_to_numpy(model.state_dict())
        model = self.kept.take((self.model_key(), key), build, self.device, initial=True)
        return model, self.kept.initial_state

    def load(self, model: torch.nn.Module, state: State) -> None:
        """Load a full numpy ``state`` into ``model`` (a kept model that fails to load is dropped)."""
        if self.kept is None or model is not self.kept.model:
            model.load_state_dict(numpy_to_torch_state(state))
        else:
            self.kept.load(model, numpy_to_torch_state(state))

    @cached_property
    def layers(self) -> ModelLayers:
        return ModelLayers.from_state(initial_state(self.cfg, self.train_data))

    def reply_metrics(self, model: torch.nn.Module) -> dict[str, float]:
        """What every train reply reports: example count, identity, local-test scores."""
        local = evaluate(model, self.test_data, self.device)
        return {
            NUM_EXAMPLES: float(len(self.train_data)),
            PARTITION_ID: float(self.partition_id),
            "local-test-accuracy": local["accuracy"],
            "local-test-loss": local["loss"],
            "local-test-examples": local["num-examples"],
        }

    def round_seed(self, server_round: int) -> int:
        """A seed unique to (run seed, round, partition): reproducible local randomness."""
        return zlib.crc32(f"{self.cfg.seed}:{server_round}:{self.partition_id}".encode())


ClientHandler = Callable[[ClientRuntime, RecordDict, Context], RecordDict]


# --- what a node keeps between rounds (``context.state``) ----------------------
def load_local_model(context: Context) -> State | None:
    """The model this node kept from its last round, if any."""
    record = context.state.array_records.get(LOCAL_MODEL)
    return from_arrayrecord(record) if isinstance(record, ArrayRecord) else None


def save_local_model(context: Context, state: State) -> None:
    """Keep the node's model for its next round."""
    context.state[LOCAL_MODEL] = to_arrayrecord(state)


def keep_if_asked(content: RecordDict, context: Context, state: State) -> None:
    """Keep the node's model for its next round when the message says so (``keep-model``)."""
    if round_config(content).keep_model:
        save_local_model(context, state)


def load_memory(context: Context, name: str) -> ConfigRecord | None:
    """A method's small memory (scalars, bytes) kept under ``name``."""
    record = context.state.config_records.get(name)
    return record if isinstance(record, ConfigRecord) else None


# --- messages ------------------------------------------------------------------
def round_config(content: RecordDict) -> RoundConfig:
    """What every message says (``wire.records.RoundConfig``); ``MessageError`` if it does not decode."""
    return decode(RoundConfig, content[CONFIG])


def server_round_of(content: RecordDict) -> int:
    """The round a message belongs to."""
    return round_config(content).server_round


def requested_layers(content: RecordDict) -> list[str]:
    """Layer names the server asked to get back."""
    return [name for name in round_config(content).request if name]


def received_state(content: RecordDict) -> State:
    """The tensors a message carries (none: an empty state)."""
    return from_arrayrecord(content[ARRAYS]) if ARRAYS in content else {}


def current_state(runtime: ClientRuntime, received: State, context: Context) -> State:
    """The node's model for this round: what it kept (else the initial model), overwritten by ``received``."""
    local = load_local_model(context)
    if local is None:
        if received.keys() == runtime.layers.keys_set:  # the whole model arrived
            return received
        local = initial_state(runtime.cfg, runtime.train_data)
    return merge(local, received)


def reply_content(state: State, layers: ModelLayers, names: list[str], metrics: dict[str, float]) -> RecordDict:
    """A reply with the named layers of ``state`` and the metrics."""
    content = RecordDict({METRICS: MetricRecord(metrics)})
    if names:
        content[ARRAYS] = to_arrayrecord(select(state, layers, names))
    return content


# --- the standard handlers -------------------------------------------------------
def standard_train(runtime: ClientRuntime, content: RecordDict, context: Context) -> RecordDict:
    """Train the whole model locally, keep it if the server says so, return the requested layers."""
    model = runtime.model_with(current_state(runtime, received_state(content), context))
    seed = runtime.round_seed(server_round_of(content))
    metrics = train_steps(model, runtime.train_data, runtime.cfg.train, runtime.device, seed)
    state = torch_state_to_numpy(model.state_dict())
    keep_if_asked(content, context, state)
    metrics.update(runtime.reply_metrics(model))
    return reply_content(state, runtime.layers, requested_layers(content), metrics)


def standard_evaluate(runtime: ClientRuntime, content: RecordDict, context: Context) -> RecordDict:
    """Evaluate the received model on the client's test split."""
    model = runtime.model_with(current_state(runtime, received_state(content), context))
    return RecordDict({METRICS: MetricRecord(evaluate(model, runtime.test_data, runtime.device))})
