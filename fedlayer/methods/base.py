"""The layer-wise strategy every fedlayer method extends; on its own it is FedAvg.

The round loop (``fedlayer.server.loop.FederatedRun``) drives a strategy
through four calls per round: ``configure_train`` -> replies ->
``aggregate_train``, optionally ``configure_evaluate`` -> replies ->
``aggregate_evaluate``, then ``evaluate_central``. Methods override small
hooks, never those calls:

- ``start_round``   per-round bookkeeping before nodes are sampled;
- ``sample_nodes``  which nodes train this round (seeded, by client id);
- ``plan``          what one node gets and must return (a ``NodePlan``);
- ``node_state``    the tensors a node receives (personalised methods);
- ``validate``      method checks on top of the reply validation;
- ``aggregate``     new values for some layers, from validated replies;
- ``round_record``, ``fedavg_state``, ``final_report``.

What a method keeps between rounds is declared once, as a dataclass extending
``StrategyState`` named by ``server_state``; ``state_dict``/``load_state_dict``
follow from it (``methods.server_state``). A round commits all or nothing
(``commit_or_drop``): ``aggregate`` may change the method's state as its
algorithm says, and if the merged model is then refused, ``load_state_dict``
restores the ``state_dict`` taken before it. So everything a method keeps
between rounds belongs in its state dataclass (exact resume needs that
anyway), and per-client files go through ``FileVersions``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log

from fedlayer.codec.options import CodecOptions
from fedlayer.codec.server import ServerCodec
from fedlayer.wire.tensors import BITS, DENSE
from fedlayer.errors import require
from fedlayer.method_report import MethodReport
from fedlayer.files import deferred_pruning, prune
from fedlayer.layers import (
    ModelLayers,
    State,
    copy_state,
    merge,
    select,
    to_arrayrecord,
)
from fedlayer.methods.aggregation import (
    RULES,
    aggregate_layers,
    lower_median,
    oversized_updates,
    rms,
    tensor_scale,
    unexpected_change,
    unexpected_updates,
    update_norms,
)
from fedlayer.methods.identity import ClientBindings, check_slot, free_client_id, slot_of
from fedlayer.methods.server_state import load_state, save_state
from fedlayer.methods.outbox import Outbox
from fedlayer.methods.server_momentum import ServerMomentum, parameter_keys
from fedlayer.methods.replies import (
    ReplyRejected,
    TrainReply,
    client_order,
    identity_query,
    parse_identity,
    validate_evaluate_reply,
    validate_train_reply,
)
from fedlayer.privacy import Privacy, PrivacyAccountant
from fedlayer.privacy.mechanism import clipped, fixed_denominator_mean, is_float
from fedlayer.wire.messages import encode
from fedlayer.wire.records import (
    ARRAYS,
    ASSIGNED_BASE,
    CODEC_SECONDS,
    CODEC_VERSION,
    CONFIG,
    DP_WITHIN_CLIP,
    NUM_EXAMPLES,
    PARTITION_ID,
    PAYLOAD,
    TRAIN_SECONDS,
    RoundConfig,
)
from fedlayer.training import Evaluator

ConfigValue = int | float | str | bool | bytes | list[int] | list[float] | list[str] | list[bool]
#: Committed rounds of update norms each tensor's ``norm_history`` keeps.
NORM_HISTORY = 10


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
class IdentityState:
    """Client ids the server assigned, and the keys bound to them (``methods.identity``)."""

    assigned: set[int]
    bindings: ClientBindings


@dataclass
class PrivacyState:
    """Central DP's noise generator, the privacy spent, and the clip in force."""

    noise_rng: np.random.Generator
    accountant: PrivacyAccountant
    clip: float | None


@dataclass
class StrategyState:
    """What every strategy keeps between rounds (``methods.server_state``); methods extend it."""

    rng: np.random.Generator
    evaluation_rng: np.random.Generator
    dropped_rounds: list[int]
    norm_history: dict[str, list[float]]
    codec: ServerCodec | None
    identity: IdentityState
    privacy: PrivacyState
    momentum: ServerMomentum | None


@dataclass
class Rejection:
    """A reply that was refused, for the metrics and the log."""

    round: int
    node_id: int
    reason: str


class LayerwiseStrategy:
    """Federated averaging, layer by layer (McMahan et al. 2017, https://arxiv.org/abs/1602.05629).

    1. Sample a fraction of the connected clients (seeded, by client id).
    2. Send each the layers its plan names (FedAvg: all) and the method config.
    3. Validate every reply; average each returned layer weighted by examples.

    Parameters
    ----------
    initial_state : State
        The initial global model (numpy state dict, model order).
    fraction_train : float
        Fraction of connected nodes sampled for training each round, in (0, 1].
    min_train_nodes : int
        At least this many nodes train each round.
    fraction_evaluate : float
        Fraction of nodes sent the model for federated evaluation (0: none;
        the server evaluates centrally).
    seed : int
        Seeds node sampling and any randomness of the method.
    aggregation_rule : str
        How a layer is formed from the replies carrying it: ``mean``
        (example-weighted), ``median`` or ``trimmed_mean`` (coordinate-wise).
    trim : float
        ``trimmed_mean``: share of values cut at each end, in [0, 0.5).
    norm_factor : float
        Update-norm guard: a reply whose update of some tensor (its value minus
        what the node was sent) has a norm above ``norm_factor`` x the round's
        median for that tensor is refused (0: guard off).
    up_bits, down_bits : int
        Codec stage (``fedlayer.codec``): bits per value of the layers each
        way, 32 (dense float32), 16, 8, 4, 2 or 1 (differences from a reference
        both ends hold).
    codec_options : CodecOptions | None
        The codec's levers (``codec.block``, ``codec.topk``, ``codec.entropy``,
        ``codec.budget_bits``, ``codec.shared_downlink``; None: all off).
    codec_reference : State | None
        The model both ends start the codec's references from: the configured
        model's initial state, as a client builds it (None: ``initial_state``).
    state_memory_mb : float | None
        In-memory budget of per-client server state (LAQ's stored updates,
        the codec's references); beyond it the states stay on disk in the run
        directory (None: no limit).
    privacy : Privacy | None
        Client-level DP (``fedlayer.privacy``, docs/privacy.md). Central: the
        layers a round releases are the fixed-denominator mean of the clipped,
        unweighted updates plus Gaussian noise (``average_layers``), the
        norm guard is off (clipping bounds every update), and each round
        spends what ``privacy_event`` says. None: off.
    server_momentum : float
        ``beta`` in [0, 1): FedAvgM's server momentum on each parameter tensor's
        update in the layers a round releases (``methods.server_momentum``; 0: off).
        Refused where the method has no global model (``no_global_model``).
    """

    method = "fedavg"
    #: Whether clients of the standard handler keep their model between rounds
    #: (needed when some layers do not travel every round).
    client_keeps_model = False
    #: Whether ``node_state`` differs between nodes (else nodes with the same
    #: plan share one ArrayRecord).
    per_node_state = False
    #: Whether the method forms layers by averaging replies (else only the mean rule applies).
    averages_layers = True
    #: Why the method has no global model for server momentum to move (None: it has one).
    no_global_model: str | None = None
    #: What the strategy checkpoints: ``state_dict``/``load_state_dict`` follow from it.
    server_state: type = StrategyState

    def __init__(
        self,
        initial_state: State,
        *,
        fraction_train: float = 1.0,
        min_train_nodes: int = 1,
        fraction_evaluate: float = 0.0,
        seed: int = 0,
        aggregation_rule: str = "mean",
        trim: float = 0.1,
        norm_factor: float = 100.0,
        up_bits: int = DENSE,
        down_bits: int = DENSE,
        codec_reference: State | None = None,
        codec_options: CodecOptions | None = None,
        state_memory_mb: float | None = None,
        privacy: Privacy | None = None,
        server_momentum: float = 0.0,
    ) -> None:
        privacy = privacy or Privacy()
        require(
            isinstance(server_momentum, (int, float)) and not isinstance(server_momentum, bool) and 0.0 <= server_momentum < 1.0,
            "server_momentum", "must lie in [0, 1)", server_momentum,
        )
        require(not server_momentum or self.no_global_model is None, "server_momentum",
                f"{type(self).__name__} cannot take it: {self.no_global_model}", server_momentum)
        require(not privacy.central or (self.averages_layers and aggregation_rule == "mean"), "aggregation_rule",
                "central DP needs the mean of layers (DP-FedAvg's sensitivity)", aggregation_rule)
        require(aggregation_rule in RULES, "aggregation_rule", f"must be one of {list(RULES)}", aggregation_rule)
        require(
            self.averages_layers or aggregation_rule == "mean", "aggregation_rule",
            f"{type(self).__name__} does not average layers; only 'mean' applies", aggregation_rule,
        )
        require(isinstance(trim, (int, float)) and 0 <= trim < 0.5, "trim", "must be in [0, 0.5)", trim)
        require(isinstance(norm_factor, (int, float)) and (norm_factor == 0 or norm_factor >= 1), "norm_factor", "must be 0 (off) or >= 1", norm_factor)
        for name, bits in (("up_bits", up_bits), ("down_bits", down_bits)):
            require(bits in BITS and not isinstance(bits, bool), name, f"must be one of {list(BITS)}", bits)
        require(state_memory_mb is None or (isinstance(state_memory_mb, (int, float)) and state_memory_mb >= 0),
                "state_memory_mb", "must be null or >= 0", state_memory_mb)
        self.state_budget_bytes = None if state_memory_mb is None else int(state_memory_mb * 2**20)
        require(isinstance(fraction_train, (int, float)) and 0 < fraction_train <= 1, "fraction_train", "must be in (0, 1]", fraction_train)
        require(isinstance(min_train_nodes, int) and min_train_nodes >= 1, "min_train_nodes", "must be an integer >= 1", min_train_nodes)
        require(isinstance(fraction_evaluate, (int, float)) and 0 <= fraction_evaluate <= 1, "fraction_evaluate", "must be in [0, 1]", fraction_evaluate)
        self.global_state: State = copy_state(initial_state)
        codec = ServerCodec(self.global_state if codec_reference is None else codec_reference, up_bits, down_bits,
                            self.state_budget_bytes, codec_options)
        self.codec: ServerCodec | None = codec if codec.active else None
        self.layers = ModelLayers.from_state(self.global_state)
        self.fraction_train = fraction_train
        self.min_train_nodes = min_train_nodes
        self.fraction_evaluate = fraction_evaluate
        self.seed = seed
        self.aggregation_rule = aggregation_rule
        self.trim = float(trim)
        #: central DP: clipping bounds every update, and a guard refusing replies by their size would pick clients by their data
        self.norm_factor = 0.0 if privacy.central else float(norm_factor)
        self.rng = np.random.default_rng(seed)
        self.privacy = privacy
        #: the clip in force (adaptive clipping moves it after every committed round; checkpointed)
        self.clip = privacy.clip
        #: central DP's noise: its own seeded generator (checkpointed), so cohorts do not depend on it
        self.noise_rng = np.random.default_rng([seed, 2])
        self.accountant = PrivacyAccountant()
        self.server_momentum = float(server_momentum)
        #: server momentum on the layers each round releases (``methods.server_momentum``; None: off; checkpointed)
        self.momentum = ServerMomentum(server_momentum, parameter_keys(self.global_state)) if server_momentum else None
        #: federated evaluation draws from its own generator, so turning it on leaves training cohorts unchanged
        self.evaluation_rng = np.random.default_rng([seed, 1])
        self.plans: dict[int, NodePlan] = {}
        self.rejections: list[Rejection] = []
        #: rounds whose merged model was refused (not finite, or a tensor moved absurdly far): nothing of them was kept
        self.dropped_rounds: list[int] = []
        #: tensor key -> per committed round that updated it, the lower median of its accepted update norms (newest last)
        self.norm_history: dict[str, list[float]] = {}
        #: node id -> its accepted reply's update norms this round (committed into ``norm_history`` with the round)
        self.round_norms: dict[int, dict[str, float]] = {}
        #: node id -> what it was sent for training this round (the norm guard's reference)
        self.sent_states: dict[int, State] = {}
        #: this round's training and evaluation messages, and the last identity queries: what a reply must answer
        self.outbox = Outbox(0, MessageType.TRAIN)
        self.evaluate_outbox = Outbox(0, MessageType.EVALUATE)
        self.query_outbox = Outbox(None, MessageType.QUERY)
        #: node id -> client id (see ``replies``); relearned in every run
        self.client_of: dict[int, int] = {}
        #: methods with a slot per client: this many slots (see ``methods.identity``)
        self.client_limit: int | None = None
        #: client ids the server assigned to nodes without a partition id (told to them in every message; checkpointed)
        self.assigned: set[int] = set()
        #: client id -> the key of the node that claimed it (``identity.bind``; checkpointed)
        self.bindings = ClientBindings()
        #: the run's key, sent in every round config so nodes key their saved round state by the run
        #: (``RunDirectory.run_key``; set by the run loop; None: no key, nodes use no saved round state)
        self.run_key: str | None = None

    # ------------------------------------------------------------------ hooks
    def start_round(self, server_round: int) -> None:
        """Per-round bookkeeping before nodes are sampled (none here)."""

    def sample_nodes(self, server_round: int, node_ids: list[int]) -> list[int]:
        """Nodes that train this round: a seeded sample of ``fraction_train``.

        Drawn over the nodes in client-id order, so the same seed picks the
        same clients in every run, whatever node ids Flower assigned.
        """
        ordered = client_order(node_ids, self.client_of)
        chosen = self.rng.choice(len(ordered), size=self.cohort_size(len(ordered)), replace=False)
        return client_order((ordered[i] for i in chosen), self.client_of)

    def cohort_size(self, available: int) -> int:
        """How many of ``available`` identified nodes a fresh sample draws."""
        return min(max(int(available * self.fraction_train), self.min_train_nodes), available)

    def privacy_event(self, server_round: int, available: int) -> tuple[float, float, int] | None:
        """What this round spends, as (sampling rate, noise multiplier, rounds) for ``PrivacyAccountant``
        (None: nothing). Central: a Gaussian mechanism sampled at cohort / available; local: one
        without amplification (the server sees who took part). Methods that sample otherwise override."""
        if not self.privacy.active or available == 0:
            return None
        rate = self.cohort_size(available) / available if self.privacy.central else 1.0
        return (rate, self.privacy.accounted_noise_multiplier(), 1)

    def privacy_budget_problem(self, server_round: int, available: int) -> str | None:
        """Why the round must not run (``privacy.target_epsilon`` would be exceeded), else None."""
        target = self.privacy.target_epsilon
        event = self.privacy_event(server_round, available)
        if target is None or event is None:
            return None
        after = self.accountant.epsilon(self.privacy.delta, extra=event)
        if after <= target:
            return None
        return f"round {server_round} would spend epsilon {after:.4g} > privacy.target_epsilon {target:g} (delta {self.privacy.delta:g})"

    def privacy_spent(self) -> dict[str, float] | None:
        """Epsilon spent so far at ``privacy.delta`` (None: privacy off)."""
        if not self.privacy.active:
            return None
        spent = {"epsilon": self.accountant.epsilon(self.privacy.delta), "delta": self.privacy.delta}
        return {**spent, "clip": self.clip} if self.privacy.adaptive_clip else spent

    def client_id(self, node_id: int) -> int:
        """The node's stable client id; an unidentified node has none (``KeyError``): it is
        never sampled and its replies are refused before any state is touched."""
        return self.client_of[node_id]

    def slot(self, node_id: int) -> int:
        """The node's per-client slot (methods with a slot per client: ``client_limit``, ``methods.identity``)."""
        return slot_of(self.client_id(node_id))

    def identified(self, node_ids: Iterable[int]) -> list[int]:
        """The nodes among ``node_ids`` whose client id is known."""
        return [node for node in node_ids if node in self.client_of]

    def plan(self, server_round: int, node_id: int) -> NodePlan:
        """What a node gets and returns; FedAvg: the whole model both ways."""
        return NodePlan(send=self.layers.names, request=self.layers.names)

    def node_state(self, node_id: int, names: list[str], message_type: str) -> State:
        """The tensors a node receives; personalised strategies override."""
        return select(self.global_state, self.layers, names)

    def message_config(self) -> dict[str, ConfigValue]:
        """Method config every message carries, train and evaluate alike (none here)."""
        return {}

    def validate(self, server_round: int, message: Message) -> TrainReply:
        """Check a reply against what its node was asked for."""
        node_id = message.metadata.src_node_id
        plan = self.plans.get(node_id)
        if plan is None:
            raise ReplyRejected(node_id, "reply from a node that was not asked to train")
        return validate_train_reply(message, self.layers, allowed=plan.request, required=plan.request)

    def aggregate(self, server_round: int, replies: list[TrainReply]) -> State:
        """New values for the layers the replies carry (by the configured rule)."""
        return self.average_layers(replies, self.layers.names)

    def average_layers(self, replies: list[TrainReply], names: Iterable[str], layers: ModelLayers | None = None) -> State:
        """The named layers (of ``layers``, default the model's) over the replies carrying them, by ``aggregation_rule``;
        with central DP, DP-FedAvg's noised mean (``private_average``): every method releases layers through here."""
        if self.privacy.central:
            return self.private_average(replies, names, layers or self.layers)
        return aggregate_layers(replies, layers or self.layers, names, self.aggregation_rule, self.trim)

    def expected_carriers(self, name: str) -> float:
        """DP-FedAvg's fixed denominator for layer ``name``: the nodes planned to return it this round
        (drawn by the server before anyone trained), not the replies that did."""
        return float(sum(name in plan.request for plan in self.plans.values()))

    def private_average(self, replies: list[TrainReply], names: Iterable[str], layers: ModelLayers) -> State:
        """Central DP: each reply's update (against what its node was sent, over all its float tensors)
        clipped again to the clip in force (a no-op for a client that clipped), then per named layer
        ``base + sum(updates) / E + N(0, (z clip / E)^2)`` with E = ``expected_carriers``, unweighted
        (adaptive clipping: the updates' share of z, ``Privacy.update_noise_multiplier``).

        Every named layer with E > 0 is released with noise, also one no reply carried (else whether
        it moved would tell who took part). Integer tensors take the plain rounded mean of their carriers.
        """
        bounded = {r.node_id: clipped(r.state, {k: self.sent_value(r.node_id, k) for k in r.state}, self.clip) for r in replies}
        out: State = {}
        for name in names:
            denominator = self.expected_carriers(name)
            if denominator <= 0:
                continue
            holders = [r for r in replies if name in r.layer_names]
            for key in layers[name].keys:
                base = self.global_state.get(key)
                if base is None:  # a tensor outside the global model (FedLP's level heads): what was sent
                    base = self.sent_value(holders[0].node_id, key) if holders else None
                if base is None:
                    continue
                if not is_float(base):
                    if holders:
                        out[key] = np.rint(np.mean([r.state[key] for r in holders], axis=0)).astype(base.dtype)
                    continue
                values = [self.carried_value(r.node_id, bounded[r.node_id][key], key, base) for r in holders]
                std = self.privacy.update_noise_multiplier() * (self.clip or 0.0) / denominator
                out[key] = fixed_denominator_mean(values, base, denominator, std, self.noise_rng)
        return out

    def adapt_clip(self, replies: list[TrainReply]) -> None:
        """Adaptive clipping (Andrew et al. 2021): from the noised share of this round's cohort whose update
        was within the clip, ``clip *= exp(-clip_lr (share - target_quantile))``. Each reply adds
        its bit minus 1/2 (sensitivity 1/2; a missing or odd answer counts as outside the clip)."""
        cohort = len(self.plans)
        if not (self.privacy.central and self.privacy.adaptive_clip) or self.clip is None or cohort == 0:
            return
        centred = sum((1.0 if r.metrics.get(DP_WITHIN_CLIP) == 1.0 else 0.0) - 0.5 for r in replies)
        share = (centred + self.noise_rng.normal(0.0, self.privacy.clip_count_stddev)) / cohort + 0.5
        self.clip *= math.exp(-self.privacy.clip_lr * (share - self.privacy.target_quantile))

    def carried_value(self, node_id: int, value: np.ndarray, key: str, base: np.ndarray) -> np.ndarray:
        """``value`` as base + its update: itself when the node was sent ``base``, else moved by the difference
        (a codec's downlink, or FedLAMA's kept layers, gave the node another starting point)."""
        sent = self.sent_value(node_id, key)
        if sent is None or sent is base or np.array_equal(sent, base):
            return value
        return (base.astype(np.float64) + (value.astype(np.float64) - sent)).astype(base.dtype)

    def evaluate_central(self, evaluator: Evaluator) -> dict[str, float]:
        """Central test metrics; ``accuracy`` and ``loss`` are the headline ones.

        Methods whose result is not one global model (per-depth models, staged
        training) override this and may add more keys.
        """
        return evaluator(self.global_state)

    def round_record(self, server_round: int) -> dict[str, Any]:
        """Extra per-round numbers for ``metrics.jsonl``."""
        return {}

    def fedavg_state(self) -> State:
        """The model FedAvg would exchange: the unit of the byte ledger's FedAvg equivalent
        (methods whose global state holds more than the configured model override)."""
        return self.global_state

    def exchanged_layers(self) -> ModelLayers:
        """Every layer a message of this method may carry, the byte ledger's names for its bytes
        (methods that exchange layers outside the global model override: FedLP's level heads)."""
        return self.layers

    def attach_run_dir(self, run_dir: Path) -> None:
        """Called with the run directory before round 1; per-client state
        goes on disk there (pFedLA's models, LAQ's updates, the codec's references)."""
        if self.codec is not None:
            self.codec.references.attach(Path(run_dir) / "server-state")
            self.codec.meant.attach(Path(run_dir) / "server-state")

    def final_report(self, records: list[dict[str, Any]]) -> MethodReport:
        """What the method reports when the run ends (numbers; the server writes and draws them): nothing here."""
        return MethodReport()

    def state_dict(self) -> dict[str, Any]:
        """Method state to checkpoint (beyond the global model): what ``server_state`` declares."""
        return save_state(self, self.server_state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict`` output."""
        load_state(self, self.server_state, state)

    def summary(self) -> None:
        """Log the strategy's configuration."""
        log(INFO, "\t├──> %s over %d layers, %d parameters", type(self).__name__, len(self.layers), self.layers.numel())
        log(INFO, "\t└──> fraction_train=%.2f min_train_nodes=%d seed=%d", self.fraction_train, self.min_train_nodes, self.seed)
        guard = f"norm guard {self.norm_factor:g} x median" if self.norm_factor else "norm guard off"
        log(INFO, "\t└──> aggregation %s (trim %g), %s", self.aggregation_rule, self.trim, guard)
        if self.codec is not None:
            log(INFO, "\t└──> codec: %s bits up, %s bits down", self.codec.up.describe(), self.codec.down.describe())
        if self.privacy.active:
            log(INFO, "\t└──> privacy %s: clip %s, noise multiplier %g, delta %g", self.privacy.mode,
                self.privacy.clip, self.privacy.noise_multiplier, self.privacy.delta)
        if self.momentum is not None:
            log(INFO, "\t└──> server momentum %g on the released layers' update", self.server_momentum)

    # ------------------------------------------------------------- identity
    def identity_queries(self, node_ids: Iterable[int]) -> list[Message]:
        """QUERY messages for the nodes whose client id is not known yet (kept: replies must answer them)."""
        queries = [identity_query(self.method, node) for node in node_ids if node not in self.client_of]
        self.query_outbox = Outbox.of(None, MessageType.QUERY, queries)
        return queries

    def register_identities(
        self, server_round: int, replies: Iterable[Message], connected: list[int], keys: Mapping[int, str] | None = None
    ) -> None:
        """Learn client ids from query replies; a bad answer, or a claim its binding refuses, is logged and counted.

        ``keys``: node id -> the key the SuperLink registered for the node
        (``identity.bind``; see ``methods.identity``). A node that asks for an
        assigned id gets the one its key is bound to, else a free one.
        """
        keys = keys or {}
        for reply in replies:
            try:
                self.query_outbox.check(server_round, reply)
                node, client, _ = parse_identity(reply, self.client_of, connected, self.client_limit)
                key = keys.get(node)
                if client is None:
                    client = self.bindings.client_of_key(key)
                if client is None:
                    client = self.free_client_id(node, connected)
                check_slot(node, client, self.taken_client_ids() - {client}, self.client_limit)
                self.bindings.check(node, client, key)
            except ReplyRejected as rejected:
                self.reject(server_round, rejected)
                continue
            self.bindings.bind(client, key)
            for gone in [n for n, c in self.client_of.items() if c == client and n != node]:
                del self.client_of[gone]
            self.client_of[node] = client
            if client >= ASSIGNED_BASE:
                self.assigned.add(client)

    def free_client_id(self, node: int, connected: list[int]) -> int:
        """A new server-assigned client id (``ASSIGNED_BASE`` and up; a slot's for methods with one per client)."""
        connected_nodes = set(connected)
        live = {c for n, c in self.client_of.items() if n in connected_nodes}
        return free_client_id(node, self.taken_client_ids(), live, set(self.bindings.keys), self.client_limit)

    def taken_client_ids(self) -> set[int]:
        """Client ids held, assigned or bound in this run."""
        return set(self.client_of.values()) | self.assigned | set(self.bindings.keys)

    def release_bindings(self, clients: Iterable[int]) -> None:
        """Release the bindings of ``clients`` (``identity.release``): the next node to claim one binds it."""
        clients = list(clients)
        released = self.bindings.release(clients)
        unbound = sorted(set(clients) - set(released))
        log(INFO, "identity: released the bindings of client ids %s%s", released, f" ({unbound} were not bound)" if unbound else "")

    def reject(self, server_round: int, rejected: ReplyRejected) -> None:
        """Log and count a refused reply."""
        log(WARNING, "round %d: %s", server_round, rejected)
        self.rejections.append(Rejection(server_round, rejected.node_id, rejected.reason))

    # ------------------------------------------------------------ the round
    def configure_train(self, server_round: int, node_ids: list[int]) -> list[Message]:
        """Per-node training messages for this round's sample of ``node_ids`` (identified ones only)."""
        self.start_round(server_round)
        node_ids = self.identified(node_ids)
        event = self.privacy_event(server_round, len(node_ids))
        chosen = self.sample_nodes(server_round, node_ids)
        self.plans = {node: self.plan(server_round, node) for node in chosen}
        if event is not None:  # charged when the round is sent out, whether or not it commits
            self.accountant.compose(*event)
        self.sent_states = {}
        if self.codec is not None:
            self.codec.start_round()
        log(INFO, "configure_train: %d of %d nodes", len(chosen), len(node_ids))
        messages = self.build_messages(server_round, self.plans, MessageType.TRAIN)
        self.outbox = Outbox.of(server_round, MessageType.TRAIN, messages)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message], *, min_replies: int = 1) -> dict[str, float] | None:
        """Validate, aggregate layer by layer, merge into the global model; the replies' mean metrics.

        None, with the model and the method's state unchanged, when fewer than
        ``min_replies`` replies are accepted (``federation.min_replies``).
        """
        valid = self.accept_replies(server_round, replies)
        if len(valid) < min_replies:
            log(WARNING, "round %d: %d accepted replies < min_replies=%d; global model unchanged", server_round, len(valid), min_replies)
            if self.codec is not None:  # the accepted clients hold the references they were sent
                self.codec.commit([self.client_id(r.node_id) for r in valid], server_round)
            return None
        self.commit_or_drop(server_round, valid)
        self.adapt_clip(valid)
        return weighted_mean([{**r.metrics, NUM_EXAMPLES: float(r.num_examples)} for r in valid])

    def commit_or_drop(self, server_round: int, valid: list[TrainReply]) -> None:
        """A round commits all or nothing: compute, check, then commit.

        The method aggregates (changing its own state as its algorithm says),
        server momentum moves the released layers (``server_momentum``); then
        the merged model is checked (``merged_model_problem``). If it passes, it becomes the global model and the round's codec references
        and update norms are committed; if not, the method's state is restored
        from the snapshot taken before (``state_dict``, the state a resumed run
        continues from, so it is complete) and the files the round wrote are
        removed again (old versions are pruned only once a round commits).
        """
        before = self.state_dict()
        with deferred_pruning() as written:
            update = self.aggregate(server_round, valid)
            if self.momentum is not None:
                update = self.momentum.apply(self.global_state, update)
            merged = merge(self.global_state, update)
            problem = self.merged_model_problem(merged)
        if problem is not None:
            log(WARNING, "round %d: the aggregated model is refused (%s); the round is dropped", server_round, problem)
            self.load_state_dict(before)
            self.dropped_rounds.append(server_round)
            return
        self.global_state = merged
        if self.codec is not None:
            self.codec.commit([self.client_id(r.node_id) for r in valid], server_round)
        self.note_update_norms([self.round_norms[r.node_id] for r in valid if r.node_id in self.round_norms])
        prune(written)

    def merged_model_problem(self, merged: State) -> str | None:
        """Why ``merged`` must not replace the global model (None: it may): a value that is
        not finite, or, with the norm guard on, a tensor moved by more than ``norm_factor``
        x its size (``aggregation.unexpected_change``)."""
        if not all_finite(merged):
            return "it is not finite"
        return unexpected_change(self.global_state, merged, self.norm_factor) if self.norm_factor else None

    def note_update_norms(self, accepted: list[dict[str, float]]) -> None:
        """A committed round's update norms into ``norm_history``: per tensor, the lower
        median over the accepted replies carrying it; the newest ``NORM_HISTORY`` rounds are kept."""
        by_key: dict[str, list[float]] = {}
        for norms in accepted:
            for key, value in norms.items():
                by_key.setdefault(key, []).append(value)
        for key, values in by_key.items():
            self.norm_history[key] = [*self.norm_history.get(key, []), lower_median(values)][-NORM_HISTORY:]

    def configure_evaluate(self, server_round: int, node_ids: list[int]) -> list[Message]:
        """Federated evaluation of the model each node would use (optional)."""
        if self.fraction_evaluate <= 0.0:
            return []
        ordered = client_order(self.identified(node_ids), self.client_of)
        if not ordered:
            return []
        count = max(1, int(len(ordered) * self.fraction_evaluate))
        chosen = client_order((ordered[i] for i in self.evaluation_rng.choice(len(ordered), count, replace=False)), self.client_of)
        plans = {node: NodePlan(send=self.layers.names, request=[]) for node in chosen}
        messages = self.build_messages(server_round, plans, MessageType.EVALUATE)
        self.evaluate_outbox = Outbox.of(server_round, MessageType.EVALUATE, messages)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> dict[str, float] | None:
        """Example-weighted mean of the accepted evaluation replies' metrics (``validate_evaluate_reply``);
        a refused reply is logged and counted like a training one."""
        metrics = []
        answered: set[int] = set()
        for message in replies:
            try:  # it answers this round's evaluate message to its node, once
                self.evaluate_outbox.check(server_round, message)
                if message.metadata.src_node_id in answered:
                    raise ReplyRejected(message.metadata.src_node_id, "a second evaluate reply to the same round")
                answered.add(message.metadata.src_node_id)
                metrics.append(validate_evaluate_reply(message))
            except ReplyRejected as rejected:
                self.reject(server_round, rejected)
        return weighted_mean(metrics) if metrics else None

    # ------------------------------------------------------- message plumbing
    def build_messages(self, server_round: int, plans: dict[int, NodePlan], message_type: str) -> list[Message]:
        """One message per planned node; nodes sent the same layers share one ArrayRecord
        unless ``per_node_state``."""
        shared: dict[tuple[str, ...], Any] = {}
        messages = []
        for node, plan in plans.items():
            adaptive_clip = message_type == MessageType.TRAIN and self.privacy.central and self.privacy.adaptive_clip
            config = {
                **encode(RoundConfig(
                    server_round=server_round, method=self.method, request=list(plan.request) or [""],
                    keep_model=self.client_keeps_model, dp_clip=self.clip if adaptive_clip else None,
                    client_id=self.client_of[node] if self.client_of.get(node) in self.assigned else None,
                    run_key=self.run_key,
                )),
                **self.message_config(),
                **plan.config,
            }
            records: dict[str, ArrayRecord] = {}
            if self.codec is not None:
                state = self.node_state(node, plan.send, message_type) if plan.send else {}
                codec_config, records, state = self.codec.download(self.client_id(node), state, message_type == MessageType.TRAIN)
                config.update(codec_config)
            elif plan.send:
                key = tuple(plan.send)
                if self.per_node_state or key not in shared:
                    state = self.node_state(node, plan.send, message_type)
                    shared[key] = (state, to_arrayrecord(state))
                state, records[ARRAYS] = shared[key]
            if plan.send and message_type == MessageType.TRAIN:
                self.sent_states[node] = state
            content = RecordDict({CONFIG: ConfigRecord(config), **records})
            if plan.payload:
                content[PAYLOAD] = ConfigRecord(dict(plan.payload))
            messages.append(Message(content=content, message_type=message_type, dst_node_id=node))
        return messages

    def accept_replies(self, server_round: int, replies: Iterable[Message]) -> list[TrainReply]:
        """Validate replies, then apply the update-norm guard; log and count each rejection.

        One reply per node and round: a second one is refused. A reply that
        names a partition id other than its node's registered client id is
        refused. Valid replies come back sorted by client id (then node id),
        so float sums do not depend on arrival order and runs repeat exactly.
        """
        valid: list[TrainReply] = []
        answered: set[int] = set()
        for message in replies:
            try:
                node = message.metadata.src_node_id
                self.require_identified(node)
                self.outbox.check(server_round, message)  # it answers this round's train message to this node
                if node in answered:  # one reply per node and round: a second one is never averaged in
                    raise ReplyRejected(node, "a second reply to the same round")
                self.decode_reply(server_round, node, message)
                reply = self.validate(server_round, message)
                self.check_identity(reply)
                valid.append(reply)
                answered.add(node)
            except ReplyRejected as rejected:
                self.reject(server_round, rejected)
        valid = self.guard_update_norms(server_round, valid)
        return sorted(valid, key=lambda r: (self.client_id(r.node_id), r.node_id))  # every accepted node is identified

    def require_identified(self, node: int) -> None:
        """Refuse a reply from a node whose client id is not registered (none of its state exists)."""
        if node not in self.client_of:
            raise ReplyRejected(node, "reply from a node whose client id is not registered")

    def decode_reply(self, server_round: int, node: int, message: Message) -> None:
        """Codec stage: settle the node's reference version, decode its layers in place."""
        if self.codec is None:
            return
        try:
            self.codec.receive(self.client_id(node), message, server_round)
        except ValueError as err:  # CodecError, or a dense array that does not decode
            raise ReplyRejected(node, f"codec: {err}") from None

    def check_identity(self, reply: TrainReply) -> None:
        """A reply's ``partition-id`` (what the client says it is) must be its registered client id."""
        claimed = reply.metrics.get(PARTITION_ID)
        if claimed is not None and reply.node_id in self.client_of and claimed != self.client_of[reply.node_id]:
            raise ReplyRejected(reply.node_id, f"{PARTITION_ID} {claimed:g} != registered client {self.client_of[reply.node_id]}")

    def guard_update_norms(self, server_round: int, replies: list[TrainReply]) -> list[TrainReply]:
        """Refuse replies whose update of some tensor is over ``norm_factor`` x the round's median,
        or, for a tensor no other reply carries, over ``norm_factor`` x its ``expected_update_norm``."""
        self.round_norms = {}
        if not self.norm_factor:
            return replies
        norms = {r.node_id: n for r in replies if (n := self.update_norms(r)) is not None}
        refused = oversized_updates(norms, self.norm_factor)
        kept = {node: n for node, n in norms.items() if node not in refused}
        model_rms = functools.cache(lambda: rms(self.global_state))  # only if some tensor has a sole carrier
        refused |= unexpected_updates(kept, lambda node, key: self.expected_update_norm(node, key, model_rms()), self.norm_factor)
        for node, reason in refused.items():
            self.reject(server_round, ReplyRejected(node, reason))
        self.round_norms = {node: n for node, n in norms.items() if node not in refused}
        return [r for r in replies if r.node_id not in refused]

    def expected_update_norm(self, node_id: int, key: str, model_rms: float) -> float:
        """How large an update of ``key`` may be expected to be when no other reply carries it:
        the largest of the last ``NORM_HISTORY`` committed rounds' median update norms of ``key``,
        or the tensor's own size (``tensor_scale`` of what the node was sent), whichever is larger."""
        sent = self.sent_value(node_id, key)
        own = 0.0 if sent is None else tensor_scale(sent, model_rms)
        return max([own, *self.norm_history.get(key, [])])

    def update_norms(self, reply: TrainReply) -> dict[str, float] | None:
        """Per tensor, the norm of the reply's update against what its node was sent (None: no update)."""
        return update_norms(reply, self.sent_value)

    def sent_value(self, node_id: int, key: str) -> np.ndarray | None:
        """What ``node_id`` was sent for ``key`` this round (else the global value; None if neither)."""
        sent = self.sent_states.get(node_id, {})
        return sent[key] if key in sent else self.global_state.get(key)


def all_finite(state: State) -> bool:
    """Whether every float tensor of ``state`` is finite."""
    return all(np.isfinite(v).all() for v in state.values() if np.issubdtype(v.dtype, np.floating))


def weighted_mean(metrics: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric weighted by ``num-examples`` (which is summed); identity, codec version and
    training time (per-client health, ``clients.csv``: it would make two equal runs' metrics differ) left out."""
    total = sum(m.get(NUM_EXAMPLES, 1.0) for m in metrics)
    keys = sorted({k for m in metrics for k in m} - {NUM_EXAMPLES, PARTITION_ID, CODEC_VERSION, CODEC_SECONDS, TRAIN_SECONDS, DP_WITHIN_CLIP})
    out = {
        key: sum(m[key] * m.get(NUM_EXAMPLES, 1.0) for m in metrics if key in m)
        / max(sum(m.get(NUM_EXAMPLES, 1.0) for m in metrics if key in m), 1e-12)
        for key in keys
    }
    out[NUM_EXAMPLES] = total
    return out
