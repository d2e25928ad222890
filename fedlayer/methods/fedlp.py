"""FedLP: layer-wise pruning, homogeneous and heterogeneous (see docs/algorithms.md)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from fedlayer.errors import ParameterError, require
from fedlayer.method_report import MethodReport
from fedlayer.layers import (
    Layer,
    ModelLayers,
    State,
    select,
    to_arrayrecord,
    torch_state_to_numpy,
)
from fedlayer.methods.base import LayerwiseStrategy, NodePlan, StrategyState
from fedlayer.methods.client_half import (
    ClientRuntime,
    current_state,
    keep_if_asked,
    received_state,
    requested_layers,
    server_round_of,
)
from fedlayer.methods.replies import ReplyRejected, TrainReply, reply_message, validate_train_reply
from fedlayer.models import LayeredModel
from fedlayer.models.depth import (
    LEVEL_HEAD_PREFIX,
    DepthNet,
    init_level_head,
    level_head_module,
    level_head_name,
    level_layers,
)
from fedlayer.wire.messages import MessageError, decode, encode, encode_metrics, within, wire
from fedlayer.wire.records import ARRAYS, CONFIG
from fedlayer.training import Evaluator, num_local_steps, train_steps

HOMOGENEOUS = "homogeneous"
HETEROGENEOUS = "heterogeneous"
#: ``draw``: one keep/drop draw per pruning unit (a layer with its BatchNorm), or per tensor (the reference code)
UNIT, TENSOR = "unit", "tensor"
#: ``dropped``: a layer is averaged over the clients that kept it, or over every replier (droppers count unchanged)
KEEPERS, DAMPED = "keepers", "damped"
#: message config key telling the client that ``request`` names tensors (sent only with ``draw: tensor``)
DRAW_KEY = "fedlp-draw"
#: The plan's and the reply's depth level (heterogeneous).
DEPTH_LEVEL = "depth-level"
#: Reply metrics summed into the run's FLOP totals, and the most one reply may report (one absurd
#: or non-finite value would stay in the totals for good).
FLOP_METRICS = ("train-flops", "train-flops-full")
MAX_TRAIN_FLOPS = 1e21


@dataclass(frozen=True)
class FedLPOptions:
    """FedLP's arguments that need no model (see ``FedLPStrategy``), checked: ``ParameterError`` names the one
    that cannot work."""

    scheme: str
    p: float
    freeze_dropped: bool
    draw: str
    dropped: str

    def __post_init__(self) -> None:
        scheme, draw, dropped = self.scheme, self.draw, self.dropped
        require(scheme in (HOMOGENEOUS, HETEROGENEOUS), "scheme", f"must be {HOMOGENEOUS} or {HETEROGENEOUS}", scheme)
        require(isinstance(self.p, (int, float)) and 0.0 <= self.p <= 1.0, "p", "must lie in [0, 1]", self.p)
        require(draw in (UNIT, TENSOR), "draw", f"must be {UNIT} or {TENSOR}", draw)
        require(draw == UNIT or scheme == HOMOGENEOUS, "draw", f"{TENSOR} applies to the {HOMOGENEOUS} scheme only", draw)
        require(dropped in (KEEPERS, DAMPED), "dropped", f"must be {KEEPERS} or {DAMPED}", dropped)
        require(dropped == KEEPERS or scheme == HOMOGENEOUS, "dropped", f"{DAMPED} applies to the {HOMOGENEOUS} scheme only", dropped)


@dataclass(frozen=True)
class FedLPConfig:
    """Down: the scheme; homogeneous, whether to freeze dropped layers and (``draw: tensor`` only, so the
    default messages stay as they were) that ``request`` names tensors; heterogeneous, the planned depth level."""

    scheme: str = wire("fedlp-scheme")
    freeze_dropped: bool | None = wire("freeze-dropped", None)
    draw: str | None = wire(DRAW_KEY, None)
    depth_level: int | None = wire(DEPTH_LEVEL, None)

    def check(self) -> None:
        if self.scheme not in (HOMOGENEOUS, HETEROGENEOUS):
            raise MessageError(f"'fedlp-scheme' must be {HOMOGENEOUS} or {HETEROGENEOUS}, got {self.scheme!r}")
        if self.scheme == HETEROGENEOUS and self.depth_level is None:
            raise MessageError(f"{DEPTH_LEVEL!r} missing ({HETEROGENEOUS} scheme)")


@dataclass(frozen=True)
class FedLPReport:
    """Up: the training FLOPs of the reply and of full-model training (each in ``[0, MAX_TRAIN_FLOPS]``),
    and, heterogeneous, the depth level the node trained."""

    train_flops: float | None = wire(FLOP_METRICS[0], None)
    train_flops_full: float | None = wire(FLOP_METRICS[1], None)
    depth_level: int | None = wire(DEPTH_LEVEL, None)

    def check(self) -> None:
        within(FLOP_METRICS[0], self.train_flops, 0.0, MAX_TRAIN_FLOPS)
        within(FLOP_METRICS[1], self.train_flops_full, 0.0, MAX_TRAIN_FLOPS)


@dataclass
class FedLPState(StrategyState):
    """What FedLP keeps between rounds (checkpointed; see ``methods.server_state``)."""

    #: client id -> depth level learned from its replies
    node_levels: dict[int, int]
    #: heterogeneous: the level heads (outside the global model)
    level_heads: dict[str, np.ndarray]
    round_info: dict[int, dict[str, Any]]
    flop_totals: dict[str, float]


class FedLPStrategy(LayerwiseStrategy):
    """FedLP (Zhu et al., ICC 2023, https://arxiv.org/abs/2303.06360).

    Homogeneous scheme, each round:

    1. Every sampled client ``k`` gets the global model and keeps each pruning
       unit (a layer, with its BatchNorm) with probability ``p_l``: mask ``m_k``.
    2. The client trains and uploads the kept layers only.
    3. ``W_l <- sum_{k: m_kl = 1} n_k W_l^k / sum_{k: m_kl = 1} n_k``; a layer
       nobody kept stays as it was.

    Heterogeneous scheme: client ``k`` has a depth level ``c_k`` in ``1..L``
    (drawn once from ``level_preference``, capped by the node); it trains and
    exchanges blocks ``1..c_k`` and the level-``c_k`` head; each layer is
    averaged over the clients that hold it.

    Two levers change steps 1 and 3 (issue #19; defaults are the paper's
    algorithm as above, see docs/algorithms.md for what each measured):
    ``draw`` (per unit or per tensor) and ``dropped`` (average over the keepers, or
    over every replier with a dropper counting its unchanged copy). Server
    momentum, measured with them, is an option of every method (``LayerwiseStrategy``).

    Parameters
    ----------
    initial_state : State
        The initial global model.
    model : LayeredModel
        The configured model (its blocks define depth levels and level heads).
    scheme : str
        ``homogeneous`` or ``heterogeneous``.
    p : float
        Layer-preserving rate of the homogeneous scheme, in [0, 1].
    layer_p : Sequence[str]
        Per-unit rates overriding ``p``, as ``"<layer>=<rate>"``, named by the unit's
        first layer (a BatchNorm goes with the layer it normalises).
    freeze_dropped : bool
        Homogeneous: clients skip gradients of the layers they do not upload.
    level_preference : list[float] | None
        Heterogeneous: probability of each level 1..L (None: uniform).
    draw : str
        Homogeneous: ``unit`` (one draw per pruning unit) or ``tensor`` (one
        draw per state-dict tensor, as the reference code; ``request`` then
        names tensors).
    dropped : str
        Homogeneous: ``keepers`` (step 3 above) or ``damped``: each layer some
        client kept is averaged over every replier, a client that dropped it
        counting with the value it was sent.
    **base
        ``LayerwiseStrategy`` arguments.
    """

    method = "fedlp"
    server_state = FedLPState

    def __init__(
        self,
        initial_state: State,
        *,
        model: LayeredModel,
        scheme: str = HOMOGENEOUS,
        p: float = 0.5,
        layer_p: Sequence[str] = (),
        freeze_dropped: bool = False,
        level_preference: list[float] | None = None,
        draw: str = UNIT,
        dropped: str = KEEPERS,
        **base: Any,
    ) -> None:
        self.options = FedLPOptions(scheme=scheme, p=p, freeze_dropped=freeze_dropped, draw=draw, dropped=dropped)
        super().__init__(initial_state, **base)
        rates = parse_layer_rates(layer_p)
        unknown = sorted(set(rates) - set(self.layers.names))
        require(not unknown, "layer_p", f"unknown layers {unknown}; layers are {self.layers.names}", layer_p)
        self.units = pruning_units(self.layers)
        followers = {name: unit[0] for unit in self.units for name in unit[1:]}
        tied = sorted(name for name in rates if name in followers)
        require(not tied, "layer_p", f"{tied} go with the layer they normalise ({[followers[n] for n in tied]}): set its rate", layer_p)
        self.keep_rate = {name: float(rates.get(name, p)) for name in self.layers.names}
        self.depth = len(model.blocks)
        require(self.depth >= 1, "model", "FedLP prunes layers of a model with feature blocks (not linear)", type(model).__name__)
        preference = [float(v) for v in level_preference] if level_preference is not None else [1.0 / self.depth] * self.depth
        require(bool(preference) and min(preference) >= 0 and sum(preference) > 0, "level_preference", "must be non-negative with a positive sum", preference)
        require(len(preference) == self.depth, "level_preference", f"needs {self.depth} probabilities (levels 1..{self.depth})", preference)
        self.level_preference = np.asarray(preference, dtype=np.float64) / float(sum(preference))
        self.level_heads: State = {}
        if scheme == HETEROGENEOUS:
            for level in range(1, self.depth):
                self.level_heads.update(init_level_head(model, level, self.seed))
        self.head_layers = ModelLayers.from_state(self.level_heads)
        self.all_layers = ModelLayers([*self.layers, *self.head_layers])
        #: what a homogeneous client keeps or drops: layers (units of them), or single tensors
        self.kept_layers = tensor_layers(self.layers) if draw == TENSOR else self.layers
        #: client id -> depth level learned from its replies
        self.node_levels: dict[int, int] = {}
        #: the latest committed round's numbers for ``round_record``, by its round (one entry)
        self.round_info: dict[int, dict[str, Any]] = {}
        #: the run's training FLOPs and what full-model training would have cost, as running totals
        self.flop_totals = {"train_flops": 0.0, "fedavg_train_flops": 0.0}

    # ------------------------------------------------------------------ levels
    def level_of(self, client: int) -> int:
        """A client's depth level: learned from its replies, else drawn once from the preference."""
        if client in self.node_levels:
            return self.node_levels[client]
        rng = np.random.default_rng([self.seed, client])
        return int(rng.choice(self.depth, p=self.level_preference)) + 1

    def level_layers(self, level: int) -> list[str]:
        """Layers a level-``level`` node holds: its blocks and its head."""
        return level_layers(self.layers.names, level, self.depth)

    def keep_mask(self, server_round: int, client: int) -> list[str]:
        """Homogeneous: the layers a client keeps this round (seeded per round and client).

        One draw per pruning unit (see ``pruning_units``) with the rate of the
        unit's first layer. With ``draw: tensor``, the kept tensors (state-dict
        keys) instead: one draw per tensor, with the rate of its unit.
        """
        rng = np.random.default_rng([self.seed, server_round, client])
        if self.options.draw == TENSOR:
            rate = {n: self.keep_rate[unit[0]] for unit in self.units for n in unit}
            keys = self.layers.keys
            draws = rng.random(len(keys))
            return [k for k, u in zip(keys, draws) if u < rate[self.layers.layer_of(k)]]
        draws = rng.random(len(self.units))
        return [n for unit, u in zip(self.units, draws) if u < self.keep_rate[unit[0]] for n in unit]

    # ------------------------------------------------------------------ hooks
    def plan(self, server_round: int, node_id: int) -> NodePlan:
        if self.options.scheme == HOMOGENEOUS:
            keep = self.keep_mask(server_round, self.client_id(node_id))
            message = FedLPConfig(HOMOGENEOUS, freeze_dropped=self.options.freeze_dropped, draw=TENSOR if self.options.draw == TENSOR else None)
            return NodePlan(send=self.layers.names, request=keep, config=encode(message))
        level = self.level_of(self.client_id(node_id))
        names = self.level_layers(level)
        return NodePlan(send=names, request=names, config=encode(FedLPConfig(HETEROGENEOUS, depth_level=level)))

    def node_state(self, node_id: int, names: list[str], message_type: str) -> State:
        model = [n for n in names if not n.startswith(LEVEL_HEAD_PREFIX)]
        heads = [n for n in names if n.startswith(LEVEL_HEAD_PREFIX)]
        state = select(self.global_state, self.layers, model)
        state.update(select(self.level_heads, self.head_layers, heads))
        return state

    def validate(self, server_round: int, message: Message) -> TrainReply:
        node_id = message.metadata.src_node_id
        plan = self.plans.get(node_id)
        if plan is None:
            raise ReplyRejected(node_id, "reply from a node that was not asked to train")
        if self.options.scheme == HOMOGENEOUS:  # exactly the kept layers (or tensors)
            reply = validate_train_reply(message, self.kept_layers, allowed=plan.request, required=plan.request)
            reply_message(FedLPReport, reply)
            return reply
        planned = int(plan.config[DEPTH_LEVEL])
        reply = validate_train_reply(message, self.all_layers, allowed=plan.request, required=None)
        level = reply_message(FedLPReport, reply).depth_level
        if level is None or not 1 <= level <= planned:
            raise ReplyRejected(node_id, f"{DEPTH_LEVEL} must be an integer in 1..{planned}, got {level}")
        # A node capped below its planned level was not sent its level's head: it
        # returns its blocks only, never a freshly initialised head.
        expected = set(self.level_layers(int(level))) & set(plan.send)
        if reply.layer_names != expected:
            raise ReplyRejected(node_id, f"level {int(level)} reply must carry exactly {sorted(expected)}")
        return reply

    def aggregate(self, server_round: int, replies: list[TrainReply]) -> State:
        info: dict[str, Any] = {
            "train_flops": sum(r.metrics.get("train-flops", 0.0) for r in replies),
            "fedavg_train_flops": sum(r.metrics.get("train-flops-full", 0.0) for r in replies),
        }
        if self.options.scheme == HOMOGENEOUS:
            units = self.kept_layers
            averaged = replies if self.options.dropped == KEEPERS else self.damped_replies(replies)
            update = self.average_layers(averaged, units.names, units)
            kept = [len(r.layer_names) / len(units) for r in replies]
            info["kept_layer_fraction"] = float(np.mean(kept))
            info["layers_kept_by_nobody"] = [n for n in units.names if all(n not in r.layer_names for r in replies)]
        else:
            update = self.average_layers(replies, self.all_layers.names, self.all_layers)
            for reply in replies:
                self.node_levels[self.client_id(reply.node_id)] = int(reply.metrics["depth-level"])
            levels = [int(r.metrics["depth-level"]) for r in replies]
            info["level_counts"] = {str(c): levels.count(c) for c in range(1, self.depth + 1)}
            heads = {k: v for k, v in update.items() if k.startswith(LEVEL_HEAD_PREFIX)}
            self.level_heads.update({k: np.array(v, dtype=self.level_heads[k].dtype) for k, v in heads.items()})
            update = {k: v for k, v in update.items() if k not in heads}
        self.round_info = {server_round: info}
        for key in self.flop_totals:
            self.flop_totals[key] += info[key]
        return update

    def damped_replies(self, replies: list[TrainReply]) -> list[TrainReply]:
        """``dropped: damped``: every reply filled up with what its node was sent for
        the units it dropped, for each unit some reply kept (a unit nobody kept stays absent,
        so it stays exactly as it was)."""
        units = self.kept_layers
        kept = {n for r in replies for n in r.layer_names}
        filled = []
        for reply in replies:
            state = dict(reply.state)
            for name in kept - reply.layer_names:
                for key in units[name].keys:
                    value = self.sent_value(reply.node_id, key)
                    assert value is not None  # every model key has a global value
                    state[key] = value
            filled.append(TrainReply(reply.node_id, state, set(kept), reply.num_examples, reply.metrics, reply.payload))
        return filled

    def round_record(self, server_round: int) -> dict[str, Any]:
        info = dict(self.round_info.get(server_round, {}))
        info["total_train_flops"] = self.flop_totals["train_flops"]
        info["total_fedavg_train_flops"] = self.flop_totals["fedavg_train_flops"]
        return info

    def exchanged_layers(self) -> ModelLayers:
        """The model's layers and the level heads (heterogeneous scheme)."""
        return self.all_layers

    def evaluate_central(self, evaluator: Evaluator) -> dict[str, float]:
        """Full-depth accuracy; heterogeneous adds ``accuracy-depth-<c>`` for every level."""
        result = dict(evaluator(self.global_state))  # also loads the global state into evaluator.model
        if self.options.scheme != HETEROGENEOUS:
            return result
        for level in range(1, self.depth):
            net = DepthNet(evaluator.model, level, level_head_module(self.level_heads, level))
            result[f"accuracy-depth-{level}"] = evaluator.evaluate_module(net)["accuracy"]
        result[f"accuracy-depth-{self.depth}"] = result["accuracy"]
        return result

    def final_report(self, records: list[dict[str, Any]]) -> MethodReport:
        """``fedlp.json``: total training FLOPs next to full-model training, last per-depth accuracies."""
        last = records[-1] if records else {}
        strategy = last.get("strategy") or {}
        flops, full = strategy.get("total_train_flops", 0.0), strategy.get("total_fedavg_train_flops", 0.0)
        central = last.get("central") or {}
        summary = {
            "scheme": self.options.scheme,
            "train_flops": flops,
            "fedavg_train_flops": full,
            "flops_ratio_vs_fedavg": flops / full if full else None,
            "depth_accuracy": {k: v for k, v in central.items() if k.startswith("accuracy-depth-")},
            "node_levels": {str(k): v for k, v in self.node_levels.items()},
        }
        return MethodReport(documents={"fedlp.json": summary})



# --- pruning units and rates ---------------------------------------------------------
def parse_layer_rates(entries: Any) -> dict[str, float]:
    """``strategy.layer_p`` (a list of ``"<layer>=<rate>"``) as {layer: rate}.

    A list of strings rather than a mapping, because layer names contain dots
    that Hydra overrides would read as nesting.
    """
    rates: dict[str, float] = {}
    for entry in entries or []:
        name, sep, rate = str(entry).partition("=")
        try:
            value = float(rate)
        except ValueError:
            value = float("nan")
        if not sep or not name or not 0.0 <= value <= 1.0:
            raise ParameterError("layer_p", f"entries are '<layer>=<rate in [0, 1]>', got {entry!r}")
        rates[name] = value
    return rates


def pruning_units(layers: ModelLayers) -> list[list[str]]:
    """Layers kept or dropped together: a BatchNorm goes with the layer before it.

    Its running statistics describe that layer's outputs; averaging the two
    over different sets of clients (or updating one and not the other) leaves
    the global model's normalisation out of step with its weights.
    """
    units: list[list[str]] = []
    for layer in layers:
        if units and any(key.endswith(".running_mean") for key in layer.keys):
            units[-1].append(layer.name)
        else:
            units.append([layer.name])
    return units


def tensor_layers(layers: ModelLayers) -> ModelLayers:
    """``layers`` with every tensor a layer of its own, named by its key (``draw: tensor``)."""
    return ModelLayers(
        Layer(name=key, keys=(key,), shapes=(shape,), dtypes=(dtype,))
        for layer in layers
        for key, shape, dtype in zip(layer.keys, layer.shapes, layer.dtypes)
    )


# --- client half ----------------------------------------------------------------
def step_flops(net: nn.Module, x: Tensor, y: Tensor) -> int:
    """FLOPs of one training step (forward, loss, backward) of a copy of ``net``."""
    clone = copy.deepcopy(net).train()
    with FlopCounterMode(display=False) as counter:
        loss = nn.functional.cross_entropy(clone(x), y)
        if loss.requires_grad:
            loss.backward()
    return int(counter.get_total_flops())


def _flops(runtime: ClientRuntime, net: nn.Module, full: nn.Module, steps: int) -> tuple[float, float]:
    """Training FLOPs of ``steps`` steps of ``net``, and of full-model training (``full``)."""
    batch = min(len(runtime.train_data), int(runtime.cfg.train.batch_size))
    x = torch.from_numpy(runtime.train_data.x[:batch]).to(runtime.device)
    y = torch.from_numpy(runtime.train_data.y[:batch]).to(runtime.device)
    full_steps = num_local_steps(runtime.cfg.train, len(runtime.train_data))
    return float(step_flops(net, x, y) * steps), float(step_flops(full, x, y) * full_steps)


def _train(runtime: ClientRuntime, net: nn.Module, server_round: int) -> dict[str, float]:
    params = [p for p in net.parameters() if p.requires_grad]
    if not params:  # every layer dropped and frozen: nothing to compute
        return {"local-steps": 0.0}
    seed = runtime.round_seed(server_round)
    return train_steps(net, runtime.train_data, runtime.cfg.train, runtime.device, seed, params=params)


def _depth_net(runtime: ClientRuntime, model: LayeredModel, level: int, heads: State) -> tuple[DepthNet, str | None]:
    """The level-``level`` sub-model of ``model`` and the name of the level head to
    return (None: the model's own head at full depth, or a head the node was not sent).

    A node capped below its planned level gets no head for its level: it trains
    its blocks under a freshly initialised one, which it keeps to itself
    (averaged in, it would reset the shared head); the server learns the level
    from the reply and sends that head the next time.
    """
    if level == len(model.blocks):
        return DepthNet(model, level, None), None
    name = level_head_name(level)
    received = f"{name}.weight" in heads
    if not received:
        heads = init_level_head(model, level, int(runtime.cfg.seed))
    return DepthNet(model, level, level_head_module(heads, level).to(runtime.device)), name if received else None


def fedlp_train(runtime: ClientRuntime, content: RecordDict, context: Context) -> RecordDict:
    """Train the kept layers (homogeneous) or the depth sub-model (heterogeneous);
    keep the model only if the server asks (FedLP sends every layer a node trains)."""
    config = decode(FedLPConfig, content[CONFIG])
    server_round = server_round_of(content)
    received = received_state(content)
    heads = {k: v for k, v in received.items() if k.startswith(LEVEL_HEAD_PREFIX)}
    model = runtime.model_with(current_state(runtime, {k: v for k, v in received.items() if k not in heads}, context))
    request = requested_layers(content)
    returned_head: str | None = None
    level: int | None = None

    by_tensor = config.draw == TENSOR  # request names tensors, not layers
    if config.scheme == HOMOGENEOUS:
        net: nn.Module = model
        if config.freeze_dropped:
            for key, param in model.named_parameters():
                param.requires_grad_((key if by_tensor else runtime.layers.layer_of(key)) in request)
        upload = request
    else:
        depth = len(model.blocks)
        level = config.depth_level
        assert level is not None  # FedLPConfig requires it for this scheme
        if DEPTH_LEVEL in context.node_config:
            level = max(1, min(level, int(context.node_config[DEPTH_LEVEL])))
        net, returned_head = _depth_net(runtime, model, level, heads)
        upload = [n for n in level_layers(runtime.layers.names, level, depth) if n in runtime.layers]

    metrics = _train(runtime, net, server_round)
    flops, full = _flops(runtime, net, runtime.new_model().to(runtime.device), int(metrics["local-steps"]))
    metrics.update(encode_metrics(FedLPReport(train_flops=flops, train_flops_full=full, depth_level=level)))
    state = torch_state_to_numpy(model.state_dict())
    keep_if_asked(content, context, state)
    metrics.update(runtime.reply_metrics(net))
    reply = RecordDict({"metrics": MetricRecord(metrics)})
    arrays = {k: state[k] for k in upload} if by_tensor else select(state, runtime.layers, upload)
    if returned_head is not None and isinstance(net, DepthNet):
        arrays.update({f"{returned_head}.{k}": v for k, v in torch_state_to_numpy(net.head.state_dict()).items()})
    if arrays:
        reply[ARRAYS] = to_arrayrecord(arrays)
    return reply
