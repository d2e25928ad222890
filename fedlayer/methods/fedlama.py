"""FedLAMA: layer-wise adaptive aggregation intervals (see docs/algorithms.md)."""

from __future__ import annotations
import math

from collections.abc import Sequence
from dataclasses import dataclass
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.common.logger import log

from fedlayer.errors import require
from fedlayer.method_report import IntervalHistory, MethodReport
from fedlayer.layers import Layer, ModelLayers, State
from fedlayer.methods.base import LayerwiseStrategy, NodePlan, StrategyState
from fedlayer.methods.client_half import ClientRuntime, load_local_model, standard_train
from fedlayer.methods.replies import ReplyRejected, TrainReply
from fedlayer.wire.records import ARRAYS

#: Tensor names of module buffers (BatchNorm statistics): state, not trained parameters.
BUFFERS = frozenset({"running_mean", "running_var", "num_batches_tracked"})


@dataclass
class FedLAMAState(StrategyState):
    """What FedLAMA keeps between rounds (checkpointed; see ``methods.server_state``)."""

    #: layer -> its interval (1 or phi rounds)
    intervals: dict[str, int]
    #: layer -> its latest discrepancy (None: never measured)
    discrepancy: dict[str, float | None]
    #: client ids of the phi-block's cohort
    cohort: list[int]
    #: client ids whose last reply was refused (sent every layer next time)
    resend: set[int]


class FedLAMAStrategy(LayerwiseStrategy):
    """FedLAMA (Lee et al., AAAI 2023, https://arxiv.org/abs/2110.10302).

    Rounds are grouped into phi-blocks; one round is ``tau'`` local steps.

    1. At a block start, sample the block's cohort and send it every layer.
    2. In round ``r`` layer ``l`` is due iff ``r % tau_l == 0``, ``tau_l`` in ``{1, phi}``;
       only due layers come back, and only short-interval layers go down.
    3. ``u_l = sum_i p_i x_l^i`` over the replies; ``d_l = sum_i p_i ||u_l - x_l^i||^2 / (tau_l dim_l)``
       over the layer's trainable parameters (BatchNorm statistics are averaged, not measured).
    4. At a block end after ``min_round_to_adjust``: sort layers by ``d_l``; the
       prefix up to the first ``k`` with ``delta_k >= 1 - lambda_k`` gets ``tau_l = phi``,
       the rest 1 (``delta``: share of ``sum d_l dim_l``, ``lambda``: share of parameters);
       layers without parameters (buffers only) stay at 1.

    A node whose reply is refused (a client restarted without its state folder
    refuses to train on a partial model, see ``fedlama_train``) is sent every
    layer the next time it trains.

    Parameters
    ----------
    initial_state : State
        The initial global model.
    local_steps : int
        ``tau'``, the local steps of one round: ``train.local_steps``, which the
        builder passes (one FedLAMA round is that many steps, so it is not a
        setting of its own); 0 when a round is ``train.local_epochs`` passes,
        and the discrepancy is then per round.
    phi : int
        Interval increase factor: long intervals are ``phi`` rounds, and the
        cohort and intervals change every ``phi`` rounds. 1 is FedAvg.
    min_round_to_adjust : int
        Intervals are first re-assigned at a block end ``r`` with
        ``r - 1 > min_round_to_adjust``; until then every layer syncs every round.
    **base
        ``LayerwiseStrategy`` arguments (sampling, seed).
    """

    method = "fedlama"
    client_keeps_model = True  # layers not due keep evolving on the device
    server_state = FedLAMAState

    def __init__(
        self,
        initial_state: State,
        *,
        local_steps: int = 0,
        phi: int = 2,
        min_round_to_adjust: int = 5,
        **base: Any,
    ) -> None:
        require(isinstance(phi, int) and phi >= 1, "phi", "must be an integer >= 1", phi)
        require(isinstance(min_round_to_adjust, int) and min_round_to_adjust >= 0, "min_round_to_adjust", "must be an integer >= 0", min_round_to_adjust)
        require(isinstance(local_steps, int) and local_steps >= 0, "local_steps", "must be an integer >= 0", local_steps)
        super().__init__(initial_state, **base)
        #: tau': local steps per round (0: a round is local epochs)
        self.tau_prime = local_steps
        self.phi = phi
        self.min_round_to_adjust = min_round_to_adjust
        self.intervals: dict[str, int] = {name: 1 for name in self.layers.names}
        self.discrepancy: dict[str, float | None] = {name: None for name in self.layers.names}
        self.cohort: list[int] = []
        #: client ids whose last reply was refused: their next message carries every layer
        self.resend: set[int] = set()
        #: dim_l: trainable scalars per layer
        self.sizes = {layer.name: parameter_size(layer) for layer in self.layers}
        self._record: dict[str, Any] = {}

    # ------------------------------------------------------------ schedule
    def block_start(self, server_round: int) -> bool:
        """True at the first round of a phi-block (rounds count from 1)."""
        return (server_round - 1) % self.phi == 0

    def due(self, server_round: int) -> list[str]:
        """Layers synchronised (uploaded and averaged) in this round, model order."""
        return [name for name in self.layers.names if server_round % self.intervals[name] == 0]

    def sample_nodes(self, server_round: int, node_ids: list[int]) -> list[int]:
        """A fresh cohort at a block start; otherwise the block's cohort (still connected).

        The cohort is kept as client ids, so it survives nodes reconnecting
        under new node ids and a resumed run.
        """
        if self.block_start(server_round) or not self.cohort:
            chosen = super().sample_nodes(server_round, node_ids)
            self.cohort = [self.client_id(node) for node in chosen]
            return chosen
        members = set(self.cohort)
        return [node for node in node_ids if self.client_id(node) in members]

    def privacy_event(self, server_round: int, available: int) -> tuple[float, float, int] | None:
        """Central DP: the cohort is drawn once per phi-block and released to phi times, so a block is
        charged at its start as one sampled mechanism of phi Gaussian releases (composed: noise
        multiplier z / sqrt(phi)); its other rounds spend nothing more. Local DP: every round."""
        if not self.privacy.central:
            return super().privacy_event(server_round, available)
        if not (self.block_start(server_round) or not self.cohort) or available == 0:
            return None
        return (self.cohort_size(available) / available, self.privacy.accounted_noise_multiplier() / math.sqrt(self.phi), 1)

    def plan(self, server_round: int, node_id: int) -> NodePlan:
        """Down: everything at a block start or to a node whose last reply was
        refused, else the layers averaged last round (the short-interval ones).
        Up: the layers due this round."""
        if self.block_start(server_round) or self.client_id(node_id) in self.resend:
            send = self.layers.names
        else:
            send = [name for name in self.layers.names if self.intervals[name] == 1]
        return NodePlan(send=send, request=self.due(server_round))

    def start_round(self, server_round: int) -> None:
        """Start this round's record with the intervals in force."""
        self._record = {"intervals": dict(self.intervals), "synced": [], "reassigned": False}

    # ---------------------------------------------------------- aggregation
    def validate(self, server_round: int, message: Message) -> TrainReply:
        """Base checks; a node asked to train whose reply is refused may hold no model of its
        own (it restarted without its state folder), so it is sent every layer the next time.
        A node not asked this round (an unknown or stray sender) changes nothing."""
        try:
            return super().validate(server_round, message)
        except ReplyRejected:
            node = message.metadata.src_node_id
            if node in self.plans:
                self.resend.add(self.client_id(node))
            raise

    def aggregate(self, server_round: int, replies: list[TrainReply]) -> State:
        """Average the due layers, measure their discrepancy, re-assign at block ends."""
        self.resend -= {self.client_id(reply.node_id) for reply in replies}
        update = self.average_layers(replies, self.due(server_round))
        synced = self.layers.layers_in(update.keys())
        for name in synced:
            steps = self.intervals[name] * max(self.tau_prime, 1)
            self.discrepancy[name] = layer_discrepancy(update, replies, self.layers, name, steps)
        self._record["synced"] = synced
        if server_round % self.phi == 0 and server_round - 1 > self.min_round_to_adjust:
            self._record["reassigned"] = self.reassign()
        return update

    def reassign(self) -> bool:
        """New intervals from the latest discrepancies; False (unchanged) while
        some layer with parameters has never been measured."""
        with_parameters = [name for name in self.layers.names if self.sizes[name] > 0]
        measured = {name: d for name in with_parameters if (d := self.discrepancy[name]) is not None}
        if len(measured) < len(with_parameters):
            return False
        long = set(long_interval_layers(measured, self.sizes))
        self.intervals = {name: self.phi if name in long else 1 for name in self.layers.names}
        return True

    # -------------------------------------------------------------- records
    def round_record(self, server_round: int) -> dict[str, Any]:
        """Interval (rounds) each layer had this round, the layers synchronised,
        every layer's latest discrepancy, and whether intervals were re-assigned."""
        return {**self._record, "discrepancy": dict(self.discrepancy), "cohort_size": len(self.cohort)}

    def final_report(self, records: list[dict[str, Any]]) -> MethodReport:
        """Each layer's interval (rounds) per round (drawn as ``intervals.png``)."""
        rows = [(r["round"], r["strategy"]["intervals"]) for r in records if r.get("strategy", {}).get("intervals")]
        return MethodReport(intervals=IntervalHistory(rows, self.layers.names, self.phi))

    def summary(self) -> None:
        """Log the method's own settings, then the base strategy's (as Flower's strategies do)."""
        log(INFO, "\t└──> FedLAMA tau'=%d steps, phi=%d, adjust after round %d", self.tau_prime, self.phi, self.min_round_to_adjust + 1)
        super().summary()


# --- the discrepancy and the interval rule ------------------------------------------
def parameter_keys(layer: Layer) -> list[str]:
    """The layer's trainable tensors: floating point and not a buffer.

    FedLAMA's ``x_l`` are model parameters; in the reference code the
    trainable variables, which exclude BatchNorm's running statistics. Those
    are still averaged with their layer, but measure no drift of the model.
    """
    return [
        key for key, dtype in zip(layer.keys, layer.dtypes)
        if np.issubdtype(np.dtype(dtype), np.floating) and key.rsplit(".", 1)[-1] not in BUFFERS
    ]


def parameter_size(layer: Layer) -> int:
    """``dim_l``: the number of trainable scalars of the layer."""
    shapes = dict(zip(layer.keys, layer.shapes))
    return sum(int(np.prod(shapes[key])) for key in parameter_keys(layer))


def layer_discrepancy(
    average: State, replies: Sequence[TrainReply], layers: ModelLayers, name: str, steps: float
) -> float | None:
    """``d_l = sum_i p_i ||u_l - x_l^i||^2 / (tau_l * dim_l)`` over the replies holding ``name``.

    ``u_l`` is the new average, ``p_i`` the reply's share of the holders'
    examples, ``tau_l`` = ``steps`` local steps since the last synchronisation;
    norm and ``dim_l`` cover the layer's trainable parameters only (see
    ``parameter_keys``). None when no reply holds the layer or it has no
    parameters (nothing to measure).
    """
    holders = [r for r in replies if name in r.layer_names]
    keys = parameter_keys(layers[name])
    if not holders or not keys:
        return None
    dim = sum(average[k].size for k in keys)
    total = float(sum(r.num_examples for r in holders))
    squared = 0.0
    for reply in holders:
        norm = sum(float(np.sum((average[k].astype(np.float64) - reply.state[k].astype(np.float64)) ** 2)) for k in keys)
        squared += reply.num_examples / total * norm
    return squared / (steps * dim)


def long_interval_layers(discrepancy: dict[str, float], sizes: dict[str, int]) -> list[str]:
    """Layers that get the long interval ``phi * tau'`` (step 4 of the class docstring of FedLAMAStrategy).

    Sort layers by ``d_l`` ascending and walk the list with
    ``delta_k = sum_{j<=k} d_j dim_j / sum_j d_j dim_j`` (share of the total
    discrepancy) and ``lambda_k = sum_{j<=k} dim_j / sum_j dim_j`` (share of the
    parameters); every layer up to and including the first ``k`` with
    ``delta_k >= 1 - lambda_k`` is returned. The walk always ends (at the last
    layer ``1 - lambda = 0``), so at least one layer is returned; when every
    discrepancy is zero all layers are. Ties in ``d_l`` keep model order.
    """
    order = sorted(discrepancy, key=lambda name: discrepancy[name])  # stable: model order on ties
    total_d = sum(discrepancy[n] * sizes[n] for n in order)
    total_size = sum(sizes[n] for n in order)
    chosen: list[str] = []
    acc_d = acc_size = 0.0
    for name in order:
        acc_d += discrepancy[name] * sizes[name]
        acc_size += sizes[name]
        chosen.append(name)
        delta = acc_d / total_d if total_d > 0 else 0.0
        if delta >= 1.0 - acc_size / total_size:
            break
    return chosen


# --- client half ----------------------------------------------------------------
def fedlama_train(runtime: ClientRuntime, content: RecordDict, context: Context) -> RecordDict:
    """The standard client, refusing to train on a partial model when it kept none.

    Layers not sent this round are the node's own copies, still training since
    their last synchronisation. A node restarted without its state folder has
    none: trained from initial values they would enter the next average. It
    raises instead (Flower replies with an error), and the strategy sends it
    every layer the next time.
    """
    arrays = content.array_records.get(ARRAYS)
    received = set(arrays.keys()) if arrays is not None else set()
    if load_local_model(context) is None and received != runtime.layers.keys_set:
        raise RuntimeError(
            "FedLAMA: this node holds no model of its own and was sent only some layers "
            "(restarted without its state folder?); it will be sent every layer next time"
        )
    return standard_train(runtime, content, context)
