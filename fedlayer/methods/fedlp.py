"""FedLP: layer-wise pruning, homogeneous and heterogeneous (see docs/algorithms.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from torch import nn

from fedlayer.errors import ParameterError, require
from fedlayer.layers import (
    Layer,
    ModelLayers,
    State,
    copy_state,
    select,
    to_arrayrecord,
    torch_state_to_numpy,
)
from fedlayer.methods.base import LayerwiseStrategy, NodePlan
from fedlayer.methods.client import (
    ClientRuntime,
    current_state,
    keep_if_asked,
    received_state,
    requested_layers,
    server_round_of,
)
from fedlayer.methods.replies import ReplyRejected, TrainReply, check_metric, validate_train_reply
from fedlayer.models import LayeredModel
from fedlayer.models.depth import (
    LEVEL_HEAD_PREFIX,
    DepthNet,
    init_level_head,
    level_head_module,
    level_head_name,
    level_layers,
)
from fedlayer.wire.records import ARRAYS, CONFIG
from fedlayer.training import Evaluator, num_local_steps, step_flops, train_steps

HOMOGENEOUS = "homogeneous"
HETEROGENEOUS = "heterogeneous"
#: ``draw``: one keep/drop draw per pruning unit (a layer with its BatchNorm), or per tensor (the reference code)
UNIT, TENSOR = "unit", "tensor"
#: ``dropped``: a layer is averaged over the clients that kept it, or over every replier (droppers count unchanged)
KEEPERS, DAMPED = "keepers", "damped"
#: message config key telling the client that ``request`` names tensors (sent only with ``draw: tensor``)
DRAW_KEY = "fedlp-draw"
#: Reply metrics summed into the run's FLOP totals, and the most one reply may report (one absurd
#: or non-finite value would stay in the totals for good).
FLOP_METRICS = ("train-flops", "train-flops-full")
MAX_TRAIN_FLOPS = 1e21


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

    Three levers change steps 1 and 3 (issue #19; defaults are the paper's
    algorithm as above, see docs/algorithms.md for what each measured):
    ``draw`` (per unit or per tensor), ``dropped`` (average over the keepers, or
    over every replier with a dropper counting its unchanged copy) and
    ``server_momentum`` (FedAvgM-style momentum on each layer's averaged update).

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
    layer_p : list[str]
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
    server_momentum : float
        ``beta`` in [0, 1): ``v <- beta v + (avg - W)``, ``W <- W + v`` for every
        trained float parameter of the global model a reply carried this round
        (BatchNorm statistics take the plain average; 0: off).
    **base
        ``LayerwiseStrategy`` arguments.
    """

    method = "fedlp"

    def __init__(
        self,
        initial_state: State,
        *,
        model: LayeredModel,
        scheme: str = HOMOGENEOUS,
        p: float = 0.5,
        layer_p: list[str] | None = None,
        freeze_dropped: bool = False,
        level_preference: list[float] | None = None,
        draw: str = UNIT,
        dropped: str = KEEPERS,
        server_momentum: float = 0.0,
        **base: Any,
    ) -> None:
        require(scheme in (HOMOGENEOUS, HETEROGENEOUS), "scheme", f"must be {HOMOGENEOUS} or {HETEROGENEOUS}", scheme)
        require(isinstance(p, (int, float)) and 0.0 <= p <= 1.0, "p", "must lie in [0, 1]", p)
        require(draw in (UNIT, TENSOR), "draw", f"must be {UNIT} or {TENSOR}", draw)
        require(draw == UNIT or scheme == HOMOGENEOUS, "draw", f"{TENSOR} applies to the {HOMOGENEOUS} scheme only", draw)
        require(dropped in (KEEPERS, DAMPED), "dropped", f"must be {KEEPERS} or {DAMPED}", dropped)
        require(dropped == KEEPERS or scheme == HOMOGENEOUS, "dropped", f"{DAMPED} applies to the {HOMOGENEOUS} scheme only", dropped)
        require(
            isinstance(server_momentum, (int, float)) and not isinstance(server_momentum, bool) and 0.0 <= server_momentum < 1.0,
            "server_momentum", "must lie in [0, 1)", server_momentum,
        )
        super().__init__(initial_state, **base)
        self.scheme = scheme
        self.freeze_dropped = freeze_dropped
        self.draw = draw
        self.dropped = dropped
        self.server_momentum = float(server_momentum)
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
        #: global-model keys server momentum moves: the model's parameters (not BatchNorm statistics)
        self.momentum_keys = frozenset(name for name, _ in model.named_parameters()) & frozenset(self.global_state)
        #: server momentum's velocity per key (empty until a round updates the key)
        self.velocity: State = {}
        #: client id -> depth level learned from its replies
        self.node_levels: dict[int, int] = {}
        self.round_info: dict[int, dict[str, Any]] = {}

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
        if self.draw == TENSOR:
            rate = {n: self.keep_rate[unit[0]] for unit in self.units for n in unit}
            keys = self.layers.keys
            draws = rng.random(len(keys))
            return [k for k, u in zip(keys, draws) if u < rate[self.layers.layer_of(k)]]
        draws = rng.random(len(self.units))
        return [n for unit, u in zip(self.units, draws) if u < self.keep_rate[unit[0]] for n in unit]

    # ------------------------------------------------------------------ hooks
    def plan(self, server_round: int, node_id: int) -> NodePlan:
        if self.scheme == HOMOGENEOUS:
            keep = self.keep_mask(server_round, self.client_id(node_id))
            config: dict[str, Any] = {"fedlp-scheme": HOMOGENEOUS, "freeze-dropped": self.freeze_dropped}
            if self.draw == TENSOR:  # only then, so the default messages stay as they were
                config[DRAW_KEY] = TENSOR
            return NodePlan(send=self.layers.names, request=keep, config=config)
        level = self.level_of(self.client_id(node_id))
        names = self.level_layers(level)
        config = {"fedlp-scheme": HETEROGENEOUS, "depth-level": level}
        return NodePlan(send=names, request=names, config=config)

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
        if self.scheme == HOMOGENEOUS:  # exactly the kept layers (or tensors)
            return check_flops(validate_train_reply(message, self.kept_layers, allowed=plan.request, required=plan.request))
        planned = int(plan.config["depth-level"])
        reply = check_flops(validate_train_reply(message, self.all_layers, allowed=plan.request, required=None))
        level = reply.metrics.get("depth-level")
        if level is None or level != int(level) or not 1 <= level <= planned:
            raise ReplyRejected(node_id, f"depth-level must be an integer in 1..{planned}, got {level}")
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
        if self.scheme == HOMOGENEOUS:
            units = self.kept_layers
            averaged = replies if self.dropped == KEEPERS else self.damped_replies(replies)
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
        self.round_info[server_round] = info
        return self.with_momentum(update) if self.server_momentum else update

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

    def with_momentum(self, update: State) -> State:
        """Server momentum on the averaged update of the model's parameters (FedAvgM with server lr 1):
        ``v <- beta v + (avg - W)``, new value ``W + v``. A key no reply carried keeps its value and
        its velocity; BatchNorm statistics and level heads take the plain average. An update that is
        not finite is returned as it is (the round is dropped) and the velocity stays."""
        moved = dict(update)
        velocity: State = {}
        for key in (k for k in update if k in self.momentum_keys):
            current = self.global_state[key]
            step = np.asarray(update[key], dtype=current.dtype) - current
            old = self.velocity.get(key)
            if old is None:  # a key's first update: the plain average (v = avg - W)
                velocity[key] = step
                continue
            velocity[key] = (self.server_momentum * old + step).astype(current.dtype)
            moved[key] = current + velocity[key]
        if all(np.isfinite(v).all() for v in moved.values() if np.issubdtype(np.asarray(v).dtype, np.floating)):
            self.velocity.update(velocity)
        return moved

    def round_record(self, server_round: int) -> dict[str, Any]:
        info = dict(self.round_info.get(server_round, {}))
        info["total_train_flops"] = sum(r["train_flops"] for r in self.round_info.values())
        info["total_fedavg_train_flops"] = sum(r["fedavg_train_flops"] for r in self.round_info.values())
        return info

    def evaluate_central(self, evaluator: Evaluator) -> dict[str, float]:
        """Full-depth accuracy; heterogeneous adds ``accuracy-depth-<c>`` for every level."""
        result = dict(evaluator(self.global_state))  # also loads the global state into evaluator.model
        if self.scheme != HETEROGENEOUS:
            return result
        for level in range(1, self.depth):
            net = DepthNet(evaluator.model, level, level_head_module(self.level_heads, level))
            result[f"accuracy-depth-{level}"] = evaluator.evaluate_module(net)["accuracy"]
        result[f"accuracy-depth-{self.depth}"] = result["accuracy"]
        return result

    def write_artifacts(self, run_dir: Path, records: list[dict[str, Any]]) -> None:
        """``fedlp.json``: total training FLOPs next to full-model training, last per-depth accuracies."""
        last = records[-1] if records else {}
        strategy = last.get("strategy") or {}
        flops, full = strategy.get("total_train_flops", 0.0), strategy.get("total_fedavg_train_flops", 0.0)
        central = last.get("central") or {}
        summary = {
            "scheme": self.scheme,
            "train_flops": flops,
            "fedavg_train_flops": full,
            "flops_ratio_vs_fedavg": flops / full if full else None,
            "depth_accuracy": {k: v for k, v in central.items() if k.startswith("accuracy-depth-")},
            "node_levels": {str(k): v for k, v in self.node_levels.items()},
        }
        (run_dir / "fedlp.json").write_text(json.dumps(summary, indent=2))

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "node_levels": {str(k): v for k, v in self.node_levels.items()},
            "level_heads": copy_state(self.level_heads),
            "round_info": {str(k): v for k, v in self.round_info.items()},
            "velocity": copy_state(self.velocity),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.node_levels = {int(k): int(v) for k, v in state["node_levels"].items()}
        self.level_heads = copy_state(state["level_heads"])
        self.round_info = {int(k): v for k, v in state["round_info"].items()}
        self.velocity = copy_state(state.get("velocity", {}))  # checkpoints from before server momentum have none


def check_flops(reply: TrainReply) -> TrainReply:
    """The reply, if the FLOP counts it reports lie in ``[0, MAX_TRAIN_FLOPS]``; else ``ReplyRejected``."""
    for key in FLOP_METRICS:
        check_metric(reply.metrics, reply.node_id, key, MAX_TRAIN_FLOPS)
    return reply


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
def _flop_metrics(runtime: ClientRuntime, net: nn.Module, full: nn.Module, steps: int) -> dict[str, float]:
    batch = min(len(runtime.train_data), int(runtime.cfg.train.batch_size))
    x = torch.from_numpy(runtime.train_data.x[:batch]).to(runtime.device)
    y = torch.from_numpy(runtime.train_data.y[:batch]).to(runtime.device)
    full_steps = num_local_steps(runtime.cfg.train, len(runtime.train_data))
    return {
        "train-flops": float(step_flops(net, x, y) * steps),
        "train-flops-full": float(step_flops(full, x, y) * full_steps),
    }


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
    config = content[CONFIG]
    server_round = server_round_of(content)
    received = received_state(content)
    heads = {k: v for k, v in received.items() if k.startswith(LEVEL_HEAD_PREFIX)}
    model = runtime.model_with(current_state(runtime, {k: v for k, v in received.items() if k not in heads}, context))
    request = requested_layers(content)
    metrics: dict[str, float] = {}
    returned_head: str | None = None

    by_tensor = str(config.get(DRAW_KEY, UNIT)) == TENSOR  # request names tensors, not layers
    if str(config["fedlp-scheme"]) == HOMOGENEOUS:
        net: nn.Module = model
        if bool(config["freeze-dropped"]):
            for key, param in model.named_parameters():
                param.requires_grad_((key if by_tensor else runtime.layers.layer_of(key)) in request)
        upload = request
    else:
        depth = len(model.blocks)
        level = int(config["depth-level"])
        if "depth-level" in context.node_config:
            level = max(1, min(level, int(context.node_config["depth-level"])))
        net, returned_head = _depth_net(runtime, model, level, heads)
        upload = [n for n in level_layers(runtime.layers.names, level, depth) if n in runtime.layers]
        metrics["depth-level"] = float(level)

    metrics.update(_train(runtime, net, server_round))
    metrics.update(_flop_metrics(runtime, net, runtime.new_model().to(runtime.device), int(metrics["local-steps"])))
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
