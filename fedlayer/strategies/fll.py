"""Federated layer-wise learning (FLL) with depth dropout (ALGORITHMS.md section 5).

Guo et al., "Towards Federated Learning Under Resource Constraints via
Layer-wise Training and Depth Dropout" (arXiv 2309.05213); no public code,
the schedule below is our design.

Training runs in stages of ``blocks_per_stage`` consecutive blocks. In stage
``s`` each client trains the stage's blocks plus a small linear stage head
on their (pooled) output; earlier blocks are frozen and run forward-only, later
ones do not run (see ``fedlayer.client.fll``). Only the stage's blocks and
head travel, both ways; a frozen block is sent to a node once, the first round
that node trains after the block was frozen, and the node keeps it in its
``context.state``. A stage lasts ``rounds_per_stage`` rounds, or with
``stage_rule: plateau`` ends earlier when central accuracy stops improving.
The last stage trains the last blocks with the model's own head and lasts
until the run ends.

The global state is the model's plus the stage heads
(``stage_heads.<s>.weight`` / ``.bias``), so stage heads are validated,
averaged and counted in bytes like any layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import INFO
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.common.logger import log
from flwr.serverapp import Grid
from omegaconf import DictConfig

from fedlayer.client.fll import (
    OBJECTIVES,
    StagedModel,
    StageSpec,
    evaluate_stage,
    frozen_layer_names,
    linear_probe,
    stage_layer_names,
)
from fedlayer.layers import State, numpy_to_torch_state, torch_state_to_numpy
from fedlayer.models import LayeredModel
from fedlayer.strategies.base import ConfigValue, LayerwiseStrategy, NodePlan, weighted_layer_average
from fedlayer.strategies.validation import ReplyRejected, TrainReply

STAGE_RULES = ("fixed", "plateau")


class FLLStrategy(LayerwiseStrategy):
    """Stage-by-stage training of a model's blocks with frozen, droppable prefixes.

    Parameters
    ----------
    initial_state : State
        The model's initial state (stage heads are added here).
    model : LayeredModel
        The configured model (its architecture; the values come from ``initial_state``).
    rounds_per_stage : int
        Rounds of each stage but the last (the most, with the plateau rule).
    blocks_per_stage : int
        Consecutive blocks trained together in one stage; >= the number of
        blocks gives one stage, i.e. end-to-end training.
    head_pool : int
        Stage heads see the block output average-pooled to this spatial size (0: flattened as is).
    p_drop : float
        Probability that a frozen, identity-compatible block is skipped in a local forward pass.
    objective : str
        ``supervised`` (cross-entropy) or ``contrastive`` (SimCLR NT-Xent, the
        stage head as projection; scored by a linear probe).
    temperature : float
        NT-Xent temperature.
    stage_rule : str
        ``fixed`` or ``plateau`` (end a stage after ``plateau_patience``
        evaluated rounds without a gain of ``plateau_min_delta`` in accuracy).
    """

    method = "fll"

    def __init__(
        self,
        initial_state: State,
        *,
        model: LayeredModel,
        rounds_per_stage: int = 2,
        blocks_per_stage: int = 1,
        head_pool: int = 2,
        p_drop: float = 0.0,
        objective: str = "supervised",
        temperature: float = 0.5,
        stage_rule: str = "fixed",
        plateau_patience: int = 2,
        plateau_min_delta: float = 0.005,
        probe_epochs: int = 100,
        **base: Any,
    ) -> None:
        model.load_state_dict(numpy_to_torch_state(initial_state))
        self.spec = StageSpec(len(model.blocks), blocks_per_stage)
        self.net = StagedModel(model, self.spec, head_pool, int(base.get("seed", 0)))
        super().__init__(torch_state_to_numpy(self.net.state_dict()), **base)
        self.rounds_per_stage = rounds_per_stage
        self.head_pool = head_pool
        self.p_drop = p_drop
        self.objective = objective
        self.temperature = temperature
        self.stage_rule = stage_rule
        self.plateau_patience = plateau_patience
        self.plateau_min_delta = plateau_min_delta
        self.probe_epochs = probe_epochs
        self.stage = 0
        self.stage_start = 1
        self.best_accuracy = -1.0
        self.stale_evaluations = 0
        #: client id -> frozen layers it holds in their final (global) version
        self.delivered: dict[int, set[str]] = {}
        self.round_peak: dict[str, float] = {}
        self.run_peak = 0.0

    # ---------------------------------------------------------- construction
    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        from fedlayer.config import ConfigError

        s = cfg.strategy
        for name in ("rounds_per_stage", "blocks_per_stage", "plateau_patience", "probe_epochs"):
            if int(s[name]) < 1:
                raise ConfigError(f"strategy.{name}", f"must be >= 1, got {s[name]}")
        if int(s.head_pool) < 0:
            raise ConfigError("strategy.head_pool", f"must be >= 0 (0: no pooling), got {s.head_pool}")
        if not 0.0 <= float(s.p_drop) < 1.0:
            raise ConfigError("strategy.p_drop", f"must be in [0, 1), got {s.p_drop}")
        if s.objective not in OBJECTIVES:
            raise ConfigError("strategy.objective", f"must be one of {OBJECTIVES}, got {s.objective!r}")
        if float(s.temperature) <= 0.0:
            raise ConfigError("strategy.temperature", f"must be > 0, got {s.temperature}")
        if s.stage_rule not in STAGE_RULES:
            raise ConfigError("strategy.stage_rule", f"must be one of {STAGE_RULES}, got {s.stage_rule!r}")
        if float(s.plateau_min_delta) < 0.0:
            raise ConfigError("strategy.plateau_min_delta", f"must be >= 0, got {s.plateau_min_delta}")

    @classmethod
    def method_kwargs(cls, cfg: DictConfig) -> dict[str, Any]:
        from fedlayer.workload import build_configured_model, load_workload

        s = cfg.strategy
        pool = load_workload(cfg, int(cfg.federation.num_clients)).pool
        return {
            "model": build_configured_model(cfg, pool),
            "rounds_per_stage": int(s.rounds_per_stage),
            "blocks_per_stage": int(s.blocks_per_stage),
            "head_pool": int(s.head_pool),
            "p_drop": float(s.p_drop),
            "objective": str(s.objective),
            "temperature": float(s.temperature),
            "stage_rule": str(s.stage_rule),
            "plateau_patience": int(s.plateau_patience),
            "plateau_min_delta": float(s.plateau_min_delta),
            "probe_epochs": int(s.probe_epochs),
        }

    # ---------------------------------------------------------------- stages
    def stage_layers(self, stage: int) -> list[str]:
        """Layers trained (and exchanged) in ``stage``."""
        return stage_layer_names(self.spec, self.layers.names, stage)

    def frozen_layers(self, stage: int) -> list[str]:
        """Layers of the blocks frozen in ``stage``."""
        return frozen_layer_names(self.spec, self.layers.names, stage)

    def _advance_stage(self, server_round: int) -> None:
        """Move to the next stage when the current one is done."""
        if self.spec.is_last(self.stage):
            return
        rounds_done = server_round - self.stage_start
        plateaued = self.stage_rule == "plateau" and self.stale_evaluations >= self.plateau_patience
        if rounds_done >= self.rounds_per_stage or (rounds_done > 0 and plateaued):
            self.stage += 1
            self.stage_start = server_round
            self.best_accuracy, self.stale_evaluations = -1.0, 0

    def stage_config(self) -> dict[str, ConfigValue]:
        """What a client needs to build and train the current stage."""
        return {
            "fll-stage": self.stage,
            "fll-blocks-per-stage": self.spec.blocks_per_stage,
            "fll-head-pool": self.head_pool,
            "fll-p-drop": self.p_drop,
            "fll-objective": self.objective,
            "fll-temperature": self.temperature,
        }

    # ------------------------------------------------------------------ hooks
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._advance_stage(server_round)
        return super().configure_train(server_round, arrays, config, grid)

    def plan(self, server_round: int, node_id: int) -> NodePlan:
        """The stage's layers both ways, plus frozen blocks the node does not hold yet."""
        active = set(self.stage_layers(self.stage))
        held = self.delivered.get(self.client_id(node_id), set())
        missing = {name for name in self.frozen_layers(self.stage) if name not in held}
        send = [name for name in self.layers.names if name in active | missing]
        return NodePlan(send=send, request=self.stage_layers(self.stage), config=self.stage_config())

    def build_message(
        self, server_round: int, node_id: int, plan: NodePlan, config: ConfigRecord, message_type: str
    ) -> Message:
        """Every message (evaluation ones too) names the stage."""
        plan = NodePlan(plan.send, plan.request, {**self.stage_config(), **plan.config}, plan.payload)
        return super().build_message(server_round, node_id, plan, config, message_type)

    def validate(self, server_round: int, message: Message) -> TrainReply:
        """Base checks; a client whose reply is refused may have lost its frozen blocks,
        so it is sent all of them the next time (it refuses to train without them)."""
        try:
            return super().validate(server_round, message)
        except ReplyRejected:
            self.delivered.pop(self.client_id(message.metadata.src_node_id), None)
            raise

    def aggregate(self, server_round: int, replies: list[TrainReply]) -> State:
        """Average the stage's layers; note the frozen blocks each replying node now holds."""
        frozen = set(self.frozen_layers(self.stage))
        for reply in replies:
            sent = set(self.plans[reply.node_id].send) & frozen
            self.delivered.setdefault(self.client_id(reply.node_id), set()).update(sent)
        self.round_peak = {
            key: max(r.metrics[key] for r in replies if key in r.metrics)
            for key in ("peak-train-memory-bytes", "cuda-peak-memory-bytes")
            if any(key in r.metrics for r in replies)
        }
        self.run_peak = max(self.run_peak, self.round_peak.get("peak-train-memory-bytes", 0.0))
        return weighted_layer_average(replies, self.layers, self.stage_layers(self.stage))

    def evaluate_central(self, evaluate: Callable[[State], dict[str, float]]) -> dict[str, float]:
        """The prefix up to the current stage with its head (supervised), or a
        linear probe on its features (contrastive: fitted on one half of the
        central test set, scored on the other)."""
        test_set = getattr(evaluate, "test_set", None)
        if test_set is None:
            raise TypeError("FLL's central evaluation needs the evaluator's test_set (a CentralEvaluator)")
        self.net.load_state_dict(numpy_to_torch_state(self.global_state))
        if self.objective == "supervised":
            result = evaluate_stage(self.net, self.stage, test_set, torch.device("cpu"))
        else:
            order = np.random.default_rng(self.seed).permutation(len(test_set))
            half = len(order) // 2
            result = linear_probe(
                self.net, self.stage, test_set.subset(np.sort(order[:half])), test_set.subset(np.sort(order[half:])),
                epochs=self.probe_epochs, seed=self.seed,
            )
            result["linear-probe-accuracy"] = result["accuracy"]
        if result["accuracy"] > self.best_accuracy + self.plateau_min_delta:
            self.best_accuracy, self.stale_evaluations = result["accuracy"], 0
        else:
            self.stale_evaluations += 1
        return {**result, "stage": float(self.stage)}

    def round_record(self, server_round: int) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "stage-blocks": list(self.spec.blocks(self.stage)),
            "frozen-layers-sent": sum(
                len(set(plan.send) - set(plan.request)) for plan in self.plans.values()
            ),
            **self.round_peak,
            "peak-train-memory-bytes-run": self.run_peak,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "stage": self.stage,
            "stage_start": self.stage_start,
            "best_accuracy": self.best_accuracy,
            "stale_evaluations": self.stale_evaluations,
            "delivered": {str(node): sorted(names) for node, names in self.delivered.items()},
            "run_peak": self.run_peak,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.stage = int(state["stage"])
        self.stage_start = int(state["stage_start"])
        self.best_accuracy = float(state["best_accuracy"])
        self.stale_evaluations = int(state["stale_evaluations"])
        self.delivered = {int(node): set(names) for node, names in state["delivered"].items()}
        self.run_peak = float(state["run_peak"])

    def summary(self) -> None:
        super().summary()
        log(
            INFO, "\t└──> %d stages of %d block(s), %d rounds each (%s), p_drop=%.2f, %s objective",
            self.spec.num_stages, self.spec.blocks_per_stage, self.rounds_per_stage, self.stage_rule,
            self.p_drop, self.objective,
        )
