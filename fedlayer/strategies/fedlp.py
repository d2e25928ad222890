"""FedLP (Zhu et al., ICC 2023): layer-wise pruning, homogeneous and heterogeneous.

Homogeneous scheme: each sampled client keeps each layer with probability
``p`` (per-layer overrides in ``layer_p``) and uploads only the kept layers;
each layer is averaged over the clients that kept it and stays as it was when
nobody did. A BatchNorm layer is kept or dropped together with the layer it
normalises (``pruning_units``): drawn apart, its running statistics were
averaged over other clients than its conv and the global model's central
accuracy swung wildly from round to round. The keep-mask is drawn here, on the server, per (round, client), and
sent as the node's ``request``, rather than drawn on the client:

- the drop still happens before upload, so the uplink bytes are really saved;
- validation stays exact (a reply must carry exactly the requested layers),
  so a client cannot pick which layers it shares;
- the mask is reproducible from the run seed (stateless: seeded by
  ``(seed, round, client id)``), independent of node sampling, and visible in the
  per-round record.

Downloads stay full: every client needs the whole current model to train.

Heterogeneous scheme: each node has a depth level c in 1..L (L = number of
blocks), drawn once per client from ``level_preference`` (seeded by the client id,
so stable across rounds and runs) and capped by the node's own ``depth-level`` node
config when it has one (the reply says which level was trained; the server
uses it from then on). A level-c node downloads and uploads only blocks
1..c and the level-c head. Each global layer is averaged over the nodes that
have it; the model's own ``head`` comes from full-depth nodes only.
Heads below full depth are *per-level heads shared by all nodes of that
level* (linear on the flattened block output), aggregated like any layer,
rather than the paper's private heads: with shared heads the global model can
be evaluated centrally at every depth (``accuracy-depth-<c>``), which private
heads would not allow. Level heads are kept apart from the global model
(``level_heads``), so FedAvg-equivalent bytes and checkpoints of the model are
unaffected; their bytes are real traffic and counted in the ledger's totals.

Both schemes record per round the clients' training FLOPs (``train_flops``)
next to what full-model training would have cost (``fedavg_train_flops``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Message
from omegaconf import DictConfig

from fedlayer.client.fedlp import (
    HETEROGENEOUS,
    HOMOGENEOUS,
    LEVEL_HEAD_PREFIX,
    DepthNet,
    block_index,
    init_level_head,
    level_head_module,
    level_head_name,
    level_layers,
)
from fedlayer.client.training import evaluate as evaluate_module
from fedlayer.layers import ModelLayers, State, copy_state, select
from fedlayer.strategies.base import LayerwiseStrategy, NodePlan, weighted_layer_average
from fedlayer.strategies.validation import ReplyRejected, TrainReply, validate_train_reply


def parse_layer_rates(entries: Any) -> dict[str, float]:
    """``strategy.layer_p`` (a list of ``"<layer>=<rate>"``) as {layer: rate}.

    A list of strings rather than a mapping, because layer names contain dots
    that Hydra overrides would read as nesting.
    """
    from fedlayer.config import ConfigError

    rates: dict[str, float] = {}
    for entry in entries or []:
        name, sep, rate = str(entry).partition("=")
        try:
            value = float(rate)
        except ValueError:
            value = float("nan")
        if not sep or not name or not 0.0 <= value <= 1.0:
            raise ConfigError("strategy.layer_p", f"entries are '<layer>=<rate in [0, 1]>', got {entry!r}")
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


class FedLPStrategy(LayerwiseStrategy):
    """FedLP over the layer-wise base.

    Parameters
    ----------
    scheme : str
        ``homogeneous`` or ``heterogeneous``.
    p : float
        Layer-preserving rate of the homogeneous scheme.
    layer_p : dict[str, float]
        Per-layer rates overriding ``p``.
    freeze_dropped : bool
        Homogeneous: clients skip gradients of the layers they do not upload
        (saves backward FLOPs, costs accuracy; see the config file).
    level_preference : list[float] | None
        Heterogeneous: probability of each level 1..L (None: uniform).
    level_heads : State | None
        Heterogeneous: initial heads of levels 1..L-1 (``level-heads.<c>.*``).
    """

    method = "fedlp"

    def __init__(
        self,
        initial_state: State,
        *,
        scheme: str = HOMOGENEOUS,
        p: float = 0.5,
        layer_p: dict[str, float] | None = None,
        freeze_dropped: bool = False,
        level_preference: list[float] | None = None,
        level_heads: State | None = None,
        **kwargs: Any,
    ) -> None:
        from fedlayer.config import ConfigError

        super().__init__(initial_state, **kwargs)
        self.scheme = scheme
        self.freeze_dropped = freeze_dropped
        unknown = sorted(set(layer_p or {}) - set(self.layers.names))
        if unknown:
            raise ConfigError("strategy.layer_p", f"unknown layers {unknown}; layers are {self.layers.names}")
        self.keep_rate = {name: float((layer_p or {}).get(name, p)) for name in self.layers.names}
        self.units = pruning_units(self.layers)
        self.depth = 1 + max(i for i in map(block_index, self.layers.names) if i is not None)
        preference = level_preference or [1.0 / self.depth] * self.depth
        if len(preference) != self.depth:
            raise ConfigError("strategy.level_preference", f"needs {self.depth} probabilities (levels 1..{self.depth}), got {len(preference)}")
        self.level_preference = np.asarray(preference, dtype=np.float64) / float(sum(preference))
        self.level_heads: State = copy_state(level_heads or {})
        self.head_layers = ModelLayers.from_state(self.level_heads)
        if scheme == HETEROGENEOUS and len(self.head_layers) != self.depth - 1:
            raise ValueError(f"heterogeneous FedLP needs heads for levels 1..{self.depth - 1}")
        self.all_layers = ModelLayers([*self.layers, *self.head_layers])
        #: client id -> depth level learned from its replies
        self.node_levels: dict[int, int] = {}
        self.round_info: dict[int, dict[str, Any]] = {}

    # ---------------------------------------------------------- construction
    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        from fedlayer.config import ConfigError

        s = cfg.strategy
        if s.scheme not in (HOMOGENEOUS, HETEROGENEOUS):
            raise ConfigError("strategy.scheme", f"must be {HOMOGENEOUS} or {HETEROGENEOUS}, got {s.scheme!r}")
        if not 0.0 <= float(s.p) <= 1.0:
            raise ConfigError("strategy.p", f"must lie in [0, 1], got {s.p}")
        parse_layer_rates(s.layer_p)
        if s.level_preference is not None:
            probs = [float(v) for v in s.level_preference]
            if not probs or min(probs) < 0 or sum(probs) <= 0:
                raise ConfigError("strategy.level_preference", f"must be non-negative with a positive sum, got {probs}")

    @classmethod
    def method_kwargs(cls, cfg: DictConfig) -> dict[str, Any]:
        s = cfg.strategy
        kwargs: dict[str, Any] = {
            "scheme": str(s.scheme),
            "p": float(s.p),
            "layer_p": parse_layer_rates(s.layer_p),
            "freeze_dropped": bool(s.freeze_dropped),
            "level_preference": None if s.level_preference is None else [float(v) for v in s.level_preference],
        }
        if s.scheme == HETEROGENEOUS:
            from fedlayer.workload import build_configured_model, load_workload

            model = build_configured_model(cfg, load_workload(cfg, int(cfg.federation.num_clients)).pool)
            heads: State = {}
            for level in range(1, len(model.blocks)):
                heads.update(init_level_head(model, level, int(cfg.seed)))
            kwargs["level_heads"] = heads
        return kwargs

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
        unit's first layer.
        """
        rng = np.random.default_rng([self.seed, server_round, client])
        draws = rng.random(len(self.units))
        return [n for unit, u in zip(self.units, draws) if u < self.keep_rate[unit[0]] for n in unit]

    # ------------------------------------------------------------------ hooks
    def plan(self, server_round: int, node_id: int) -> NodePlan:
        if self.scheme == HOMOGENEOUS:
            keep = self.keep_mask(server_round, self.client_id(node_id))
            config = {"fedlp-scheme": HOMOGENEOUS, "freeze-dropped": self.freeze_dropped}
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
        if self.scheme == HOMOGENEOUS:
            return super().validate(server_round, message)
        node_id = message.metadata.src_node_id
        plan = self.plans.get(node_id)
        if plan is None:
            raise ReplyRejected(node_id, "reply from a node that was not asked to train")
        planned = int(plan.config["depth-level"])
        # A capped node trains a shallower level; its head may not have been sent.
        allowed = set(plan.request) | {level_head_name(c) for c in range(1, planned)}
        reply = validate_train_reply(message, self.all_layers, allowed=allowed, required=None)
        level = reply.metrics.get("depth-level")
        if level is None or level != int(level) or not 1 <= level <= planned:
            raise ReplyRejected(node_id, f"depth-level must be an integer in 1..{planned}, got {level}")
        expected = set(self.level_layers(int(level)))
        if reply.layer_names != expected:
            raise ReplyRejected(node_id, f"level {int(level)} reply must carry exactly {sorted(expected)}")
        return reply

    def aggregate(self, server_round: int, replies: list[TrainReply]) -> State:
        update = weighted_layer_average(replies, self.all_layers, self.all_layers.names)
        info: dict[str, Any] = {
            "train_flops": sum(r.metrics.get("train-flops", 0.0) for r in replies),
            "fedavg_train_flops": sum(r.metrics.get("train-flops-full", 0.0) for r in replies),
        }
        if self.scheme == HOMOGENEOUS:
            kept = [len(r.layer_names) / len(self.layers) for r in replies]
            info["kept_layer_fraction"] = float(np.mean(kept))
            info["layers_kept_by_nobody"] = [n for n in self.layers.names if all(n not in r.layer_names for r in replies)]
        else:
            for reply in replies:
                self.node_levels[self.client_id(reply.node_id)] = int(reply.metrics["depth-level"])
            levels = [int(r.metrics["depth-level"]) for r in replies]
            info["level_counts"] = {str(c): levels.count(c) for c in range(1, self.depth + 1)}
            heads = {k: v for k, v in update.items() if k.startswith(LEVEL_HEAD_PREFIX)}
            self.level_heads.update({k: np.array(v, dtype=self.level_heads[k].dtype) for k, v in heads.items()})
            update = {k: v for k, v in update.items() if k not in heads}
        self.round_info[server_round] = info
        return update

    def round_record(self, server_round: int) -> dict[str, Any]:
        info = dict(self.round_info.get(server_round, {}))
        info["total_train_flops"] = sum(r["train_flops"] for r in self.round_info.values())
        info["total_fedavg_train_flops"] = sum(r["fedavg_train_flops"] for r in self.round_info.values())
        return info

    def evaluate_central(self, evaluate: Callable[[State], dict[str, float]]) -> dict[str, float]:
        """Full-depth accuracy; heterogeneous adds ``accuracy-depth-<c>`` for every level.

        Shallower depths need the evaluator's model and test set (the
        ``CentralEvaluator`` exposes them); ``evaluate`` has just loaded the
        global state into that model.
        """
        result = dict(evaluate(self.global_state))
        if self.scheme != HETEROGENEOUS:
            return result
        model, test_set = getattr(evaluate, "model", None), getattr(evaluate, "test_set", None)
        if model is not None and test_set is not None:
            for level in range(1, self.depth):
                net = DepthNet(model, level, level_head_module(self.level_heads, level))
                result[f"accuracy-depth-{level}"] = evaluate_module(net, test_set, torch.device("cpu"))["accuracy"]
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
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.node_levels = {int(k): int(v) for k, v in state["node_levels"].items()}
        self.level_heads = copy_state(state["level_heads"])
        self.round_info = {int(k): v for k, v in state["round_info"].items()}
