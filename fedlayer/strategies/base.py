"""Shared layer-wise plumbing for every fedlayer strategy.

``LayerwiseStrategy`` is a Flower ``Strategy`` (Message API) that owns the
full global model as a numpy state and lets each method decide, per node and
per round, which layers go down, which come back and how they are merged. A
method overrides a few small hooks:

- ``sample_nodes``  which nodes train this round (seeded);
- ``plan``          what one node gets and must return (a ``NodePlan``);
- ``aggregate``     new values for some layers, from validated replies;
- ``round_record``  extra per-round numbers for ``metrics.jsonl``;
- ``state_dict`` / ``load_state_dict`` for checkpoints.

Replies are validated before anything else sees them; a rejected reply is
logged with its node id and reason, counted, and never touches the model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from omegaconf import DictConfig

from fedlayer.layers import ModelLayers, State, copy_state, merge, select, to_arrayrecord
from fedlayer.strategies.identity import client_order, identity_query, parse_identity
from fedlayer.strategies.validation import ReplyRejected, TrainReply, validate_train_reply

ConfigValue = int | float | str | bool | bytes | list[int] | list[float] | list[str] | list[bool]


@dataclass
class NodePlan:
    """What one node receives this round and what it must send back.

    ``send`` and ``request`` are layer names (model order is restored on use);
    ``config`` holds method parameters for the client; ``payload`` optional
    extra items (bytes, scalars) that travel in a ``payload`` ConfigRecord.
    """

    send: list[str]
    request: list[str]
    config: dict[str, ConfigValue] = field(default_factory=dict)
    payload: dict[str, ConfigValue] = field(default_factory=dict)


@dataclass
class Rejection:
    """A reply that was refused, for the metrics and the log."""

    round: int
    node_id: int
    reason: str


def weighted_layer_average(
    replies: Sequence[TrainReply], layers: ModelLayers, names: Iterable[str]
) -> State:
    """Average each named layer over the replies that carry it.

    Weights are ``num_examples`` normalised over the replies holding the layer.
    The arithmetic (``sum_i value_i * (w_i / sum w)`` accumulated in reply
    order, in the tensor's dtype) matches Flower's ``aggregate_arrayrecords``,
    so FedAvg here gives the same model as Flower's FedAvg. Integer tensors
    (BatchNorm's ``num_batches_tracked``) are averaged and rounded back.
    A layer no reply carries is absent from the result (the caller keeps the old one).
    """
    out: State = {}
    for name in names:
        holders = [r for r in replies if name in r.layer_names]
        if not holders:
            continue
        total = float(sum(r.num_examples for r in holders))
        for key in layers[name].keys:
            dtype = holders[0].state[key].dtype
            floating = np.issubdtype(dtype, np.floating)
            acc: np.ndarray | None = None
            for reply in holders:
                value = reply.state[key] if floating else reply.state[key].astype(np.float64)
                term = value * (reply.num_examples / total)
                acc = term if acc is None else acc + term
            assert acc is not None
            out[key] = acc if floating else np.rint(acc).astype(dtype)
    return out


class LayerwiseStrategy(Strategy):
    """Base of all fedlayer strategies; on its own it is FedAvg.

    Parameters
    ----------
    initial_state : State
        The initial global model (numpy state dict, model order).
    fraction_train : float
        Fraction of connected nodes sampled for training each round.
    min_train_nodes : int
        At least this many nodes train each round.
    min_available_nodes : int
        Wait until this many nodes are connected before sampling.
    fraction_evaluate : float
        Fraction of nodes sent the model for federated evaluation (0: none;
        the server evaluates centrally).
    seed : int
        Seeds node sampling and any randomness of the method.
    """

    method = "fedavg"
    #: Whether clients of the standard method keep their model between rounds
    #: (needed when some layers do not travel every round). Otherwise each
    #: round's message carries the whole model and keeping it would only cost
    #: every node a model of memory (and of disk with a client state folder).
    client_keeps_model = False

    def __init__(
        self,
        initial_state: State,
        *,
        fraction_train: float = 1.0,
        min_train_nodes: int = 1,
        min_available_nodes: int = 1,
        fraction_evaluate: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.global_state: State = copy_state(initial_state)
        self.layers = ModelLayers.from_state(self.global_state)
        self.fraction_train = fraction_train
        self.min_train_nodes = min_train_nodes
        self.min_available_nodes = min_available_nodes
        self.fraction_evaluate = fraction_evaluate
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.plans: dict[int, NodePlan] = {}
        self.rejections: list[Rejection] = []
        #: node id -> client id (see ``fedlayer.strategies.identity``); relearned in every run
        self.client_of: dict[int, int] = {}
        #: client ids must be partition ids below this (methods with a slot per client)
        self.client_limit: int | None = None

    # ---------------------------------------------------------- construction
    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        """Raise ``ConfigError`` naming a bad ``strategy.*`` field (none here)."""

    @classmethod
    def method_kwargs(cls, cfg: DictConfig) -> dict[str, Any]:
        """Constructor arguments of the method, read from ``cfg.strategy``."""
        return {}

    @classmethod
    def from_config(cls, cfg: DictConfig, initial_state: State) -> LayerwiseStrategy:
        """Build the strategy from the composed config tree."""
        federation = cfg.federation
        return cls(
            initial_state,
            fraction_train=float(federation.fraction_train),
            min_train_nodes=int(federation.min_train_nodes),
            min_available_nodes=int(federation.min_available_nodes or federation.num_clients),
            fraction_evaluate=float(federation.fraction_evaluate),
            seed=int(cfg.seed),
            **cls.method_kwargs(cfg),
        )

    # ------------------------------------------------------------------ hooks
    def sample_nodes(self, server_round: int, node_ids: list[int]) -> list[int]:
        """Nodes that train this round: a seeded sample of ``fraction_train``.

        Drawn over the nodes in client-id order, so the same seed picks the
        same clients in every run, whatever node ids Flower assigned.
        """
        ordered = client_order(node_ids, self.client_of)
        count = max(int(len(ordered) * self.fraction_train), self.min_train_nodes)
        count = min(count, len(ordered))
        chosen = self.rng.choice(len(ordered), size=count, replace=False)
        return client_order((ordered[i] for i in chosen), self.client_of)

    def client_id(self, node_id: int) -> int:
        """The node's stable client id (its node id while it has not been identified)."""
        return self.client_of.get(node_id, node_id)

    def plan(self, server_round: int, node_id: int) -> NodePlan:
        """What a node gets and returns; FedAvg: the whole model both ways."""
        return NodePlan(send=self.layers.names, request=self.layers.names)

    def aggregate(self, server_round: int, replies: list[TrainReply]) -> State:
        """New values for the layers the replies carry (weighted average)."""
        return weighted_layer_average(replies, self.layers, self.layers.names)

    def round_record(self, server_round: int) -> dict[str, Any]:
        """Extra per-round numbers for ``metrics.jsonl``."""
        return {}

    def evaluate_central(self, evaluate: Callable[[State], dict[str, float]]) -> dict[str, float]:
        """Central test metrics; ``accuracy`` and ``loss`` are the headline ones.

        ``evaluate`` scores a full state of the configured model. Methods whose
        result is not one global model (per-depth models, staged training)
        override this and may add more keys.
        """
        return evaluate(self.global_state)

    def attach_run_dir(self, run_dir: Path) -> None:
        """Called with the run directory before round 1; methods that keep
        large state on disk (pFedLA's per-client models) put it there. No-op here."""

    def write_artifacts(self, run_dir: Path, records: list[dict[str, Any]]) -> None:
        """Method-specific plots/files written at the end of a run (none here)."""

    def state_dict(self) -> dict[str, Any]:
        """Method state to checkpoint (beyond the global model)."""
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict`` output."""
        self.rng.bit_generator.state = state["rng"]

    def validate(self, server_round: int, message: Message) -> TrainReply:
        """Check a reply against what its node was asked for."""
        node_id = message.metadata.src_node_id
        plan = self.plans.get(node_id)
        if plan is None:
            raise ReplyRejected(node_id, "reply from a node that was not asked to train")
        return validate_train_reply(message, self.layers, allowed=plan.request, required=plan.request)

    # ------------------------------------------------------------- identity
    def identity_queries(self, node_ids: Iterable[int]) -> list[Message]:
        """QUERY messages for the nodes whose client id is not known yet."""
        return [identity_query(self.method, node) for node in node_ids if node not in self.client_of]

    def register_identities(self, server_round: int, replies: Iterable[Message], connected: list[int]) -> None:
        """Learn client ids from query replies; a bad answer is logged and counted."""
        for reply in replies:
            try:
                node, client = parse_identity(reply, self.client_of, connected, self.client_limit)
            except ReplyRejected as rejected:
                log(WARNING, "round %d: %s", server_round, rejected)
                self.rejections.append(Rejection(server_round, rejected.node_id, rejected.reason))
                continue
            for gone in [n for n, c in self.client_of.items() if c == client and n != node]:
                del self.client_of[gone]
            self.client_of[node] = client

    # ------------------------------------------------------- message plumbing
    def connected_nodes(self, grid: Grid) -> list[int]:
        """The connected nodes, once at least ``min_available_nodes`` are."""
        while len(node_ids := sorted(grid.get_node_ids())) < self.min_available_nodes:
            log(INFO, "Waiting for nodes: %d connected, %d needed", len(node_ids), self.min_available_nodes)
            time.sleep(1.0)
        return node_ids

    def build_message(
        self, server_round: int, node_id: int, plan: NodePlan, config: ConfigRecord, message_type: str
    ) -> Message:
        """One message carrying the plan's layers, config and payload."""
        merged = ConfigRecord(dict(config.items()))
        merged["server-round"] = server_round
        merged["method"] = self.method
        merged["request"] = list(plan.request) or [""]
        merged["keep-model"] = self.client_keeps_model
        for key, value in plan.config.items():
            merged[key] = value
        content = RecordDict({"config": merged})
        if plan.send:
            content["arrays"] = to_arrayrecord(self.node_state(node_id, plan.send, message_type))
        if plan.payload:
            content["payload"] = ConfigRecord(dict(plan.payload))
        return Message(content=content, message_type=message_type, dst_node_id=node_id)

    def node_state(self, node_id: int, names: list[str], message_type: str) -> State:
        """The tensors a node receives; personalised strategies override."""
        return select(self.global_state, self.layers, names)

    # ------------------------------------------------------ Flower interface
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Per-node training messages. ``arrays`` is ignored: the strategy
        keeps the authoritative global model itself."""
        node_ids = self.connected_nodes(grid)
        chosen = self.sample_nodes(server_round, node_ids)
        self.plans = {node: self.plan(server_round, node) for node in chosen}
        log(INFO, "configure_train: %d of %d nodes", len(chosen), len(node_ids))
        return [
            self.build_message(server_round, node, plan, config, MessageType.TRAIN)
            for node, plan in self.plans.items()
        ]

    def accept_replies(self, server_round: int, replies: Iterable[Message]) -> list[TrainReply]:
        """Validate replies; log and count each rejection.

        Valid replies come back sorted by the client's partition id (else node
        id), so float sums do not depend on arrival order and runs repeat exactly.
        """
        valid: list[TrainReply] = []
        for message in replies:
            try:
                valid.append(self.validate(server_round, message))
            except ReplyRejected as rejected:
                log(WARNING, "round %d: %s", server_round, rejected)
                self.rejections.append(Rejection(server_round, rejected.node_id, rejected.reason))
        return sorted(valid, key=lambda r: (r.metrics.get("partition-id", float("inf")), r.node_id))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate, aggregate layer by layer, merge into the global model."""
        valid = self.accept_replies(server_round, replies)
        if not valid:
            log(WARNING, "round %d: no valid replies; global model unchanged", server_round)
            return None, None
        update = self.aggregate(server_round, valid)
        self.global_state = merge(self.global_state, update)
        return to_arrayrecord(self.global_state), MetricRecord(average_metrics(valid))

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Federated evaluation of the model each node would use (optional)."""
        if self.fraction_evaluate <= 0.0:
            return []
        node_ids = self.connected_nodes(grid)
        ordered = client_order(node_ids, self.client_of)
        count = max(1, int(len(ordered) * self.fraction_evaluate))
        chosen = client_order((ordered[i] for i in self.rng.choice(len(ordered), count, replace=False)), self.client_of)
        plan = NodePlan(send=self.layers.names, request=[])
        return [
            self.build_message(server_round, node, plan, config, MessageType.EVALUATE)
            for node in chosen
        ]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Example-weighted mean of the clients' evaluation metrics."""
        metrics = []
        for message in replies:
            if message.has_error() or "metrics" not in message.content.metric_records:
                continue
            record = message.content.metric_records["metrics"]
            metrics.append({k: float(v) for k, v in record.items() if isinstance(v, (int, float))})
        if not metrics:
            return None
        return MetricRecord(weighted_mean(metrics))

    def summary(self) -> None:
        """Log the strategy's configuration."""
        log(INFO, "\t├──> %s over %d layers, %d parameters", type(self).__name__, len(self.layers), self.layers.numel())
        log(INFO, "\t└──> fraction_train=%.2f min_train_nodes=%d seed=%d", self.fraction_train, self.min_train_nodes, self.seed)


def weighted_mean(metrics: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric weighted by ``num-examples`` (which is summed)."""
    total = sum(m.get("num-examples", 1.0) for m in metrics)
    keys = sorted({k for m in metrics for k in m} - {"num-examples", "partition-id"})
    out = {
        key: sum(m[key] * m.get("num-examples", 1.0) for m in metrics if key in m)
        / max(sum(m.get("num-examples", 1.0) for m in metrics if key in m), 1e-12)
        for key in keys
    }
    out["num-examples"] = total
    return out


def average_metrics(replies: list[TrainReply]) -> dict[str, float]:
    """Example-weighted mean of the replies' training metrics."""
    return weighted_mean([{**r.metrics, "num-examples": float(r.num_examples)} for r in replies])
