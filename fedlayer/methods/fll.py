"""FLL: federated layer-wise learning with depth dropout (see docs/algorithms.md)."""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from logging import INFO
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from omegaconf import OmegaConf
from torch import Tensor, nn

from fedlayer.contrastive import augment_pair, nt_xent
from fedlayer.data import ArrayDataset
from fedlayer.errors import require
from fedlayer.layers import (
    ModelLayers,
    State,
    merge,
    numpy_to_torch_state,
    torch_state_to_numpy,
)
from fedlayer.memory import measure_step, resident_tensors
from fedlayer.methods.base import (
    ConfigValue,
    LayerwiseStrategy,
    NodePlan,
    StrategyState,
)
from fedlayer.methods.client_half import (
    ClientRuntime,
    keep_if_asked,
    load_local_model,
    received_state,
    reply_content,
    requested_layers,
    server_round_of,
)
from fedlayer.methods.replies import MAX_EXAMPLES, ReplyRejected, TrainReply, reply_message
from fedlayer.models import LayeredModel
from fedlayer.models.staged import (
    STAGE_HEADS,
    StagedModel,
    StageSpec,
    frozen_layer_names,
    stage_features,
    stage_layer_names,
    stage_step_flops,
)
from fedlayer.wire.messages import MessageError, decode, encode, encode_metrics, within, wire
from fedlayer.wire.records import CONFIG, METRICS, NUM_EXAMPLES, PARTITION_ID
from fedlayer.training import (
    Evaluator,
    evaluate,
    minibatches,
    num_local_steps,
    train_steps,
)

#: Objectives: cross-entropy on labels, or SimCLR's NT-Xent on two views.
OBJECTIVES = ("supervised", "contrastive")
STAGE_RULES = ("fixed", "plateau")
STAGE_STEPS = ("fixed", "equal_flops")
#: ``stage_steps=equal_flops``: the most local steps a stage gets, as a multiple of the configured ones.
MAX_STEP_FACTOR = 4
#: Stage-config key: the multiple of the configured local steps to train (absent: 1).
STEP_FACTOR = "fll-step-factor"
#: Train-config key asking clients to hold out this fraction of their training split (plateau rule).
VALIDATION_FRACTION = "fll-validation-fraction"
#: Train-config key: epochs of the clients' validation linear probe (plateau rule; contrastive only).
PROBE_EPOCHS = "fll-probe-epochs"
#: Reply metrics: the received model's score on the held-out examples, and their count.
VAL_ACCURACY = "val-accuracy"
VAL_EXAMPLES = "val-examples"
#: Reply metrics: memory peaks of local training (``fedlayer.memory``), and the most one may report
#: (1 PiB): the run's peak is a maximum, so one absurd value would stay it for good.
MEMORY_METRICS = ("peak-train-memory-bytes", "cuda-peak-memory-bytes")
MAX_MEMORY_BYTES = float(2**50)


@dataclass(frozen=True)
class FLLOptions:
    """FLL's arguments (see ``FLLStrategy``), checked: ``ParameterError`` names the one that cannot work."""

    rounds_per_stage: int
    blocks_per_stage: int
    head_pool: int
    stage_head: str
    stage_steps: str
    checkpoint_activations: bool
    p_drop: float
    objective: str
    temperature: float
    stage_rule: str
    plateau_patience: int
    plateau_min_delta: float
    probe_epochs: int
    validation_fraction: float

    def __post_init__(self) -> None:
        for name in ("rounds_per_stage", "blocks_per_stage", "plateau_patience", "probe_epochs"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, name, "must be an integer >= 1", value)
        require(isinstance(self.head_pool, int) and self.head_pool >= 0, "head_pool", "must be an integer >= 0 (0: no pooling)", self.head_pool)
        require(self.stage_head in STAGE_HEADS, "stage_head", f"must be one of {STAGE_HEADS}", self.stage_head)
        require(self.stage_steps in STAGE_STEPS, "stage_steps", f"must be one of {STAGE_STEPS}", self.stage_steps)
        require(isinstance(self.checkpoint_activations, bool), "checkpoint_activations", "must be true or false", self.checkpoint_activations)
        require(isinstance(self.p_drop, (int, float)) and 0.0 <= self.p_drop < 1.0, "p_drop", "must be in [0, 1)", self.p_drop)
        require(self.objective in OBJECTIVES, "objective", f"must be one of {OBJECTIVES}", self.objective)
        require(isinstance(self.temperature, (int, float)) and self.temperature > 0.0, "temperature", "must be > 0", self.temperature)
        require(self.stage_rule in STAGE_RULES, "stage_rule", f"must be one of {STAGE_RULES}", self.stage_rule)
        require(isinstance(self.plateau_min_delta, (int, float)) and self.plateau_min_delta >= 0.0,
                "plateau_min_delta", "must be >= 0", self.plateau_min_delta)
        require(isinstance(self.validation_fraction, (int, float)) and 0.0 < self.validation_fraction < 1.0,
                "validation_fraction", "must be in (0, 1)", self.validation_fraction)


@dataclass(frozen=True)
class StageConfig:
    """Down: what every FLL message tells a client (the stage, how to build and train it), and,
    in training messages under the plateau rule, how to hold out and score its validation split."""

    stage: int = wire("fll-stage")
    blocks_per_stage: int = wire("fll-blocks-per-stage")
    head_pool: int = wire("fll-head-pool")
    stage_head: str = wire("fll-stage-head")
    checkpoint: bool = wire("fll-checkpoint")
    p_drop: float = wire("fll-p-drop")
    objective: str = wire("fll-objective")
    temperature: float = wire("fll-temperature")
    #: the multiple of the configured local steps to train (None: 1; sent with ``stage_steps=equal_flops`` only)
    step_factor: int | None = wire(STEP_FACTOR, None)
    validation_fraction: float | None = wire(VALIDATION_FRACTION, None)
    probe_epochs: int | None = wire(PROBE_EPOCHS, None)


@dataclass(frozen=True)
class StageReport:
    """Up: what an FLL reply reports beyond the standard metrics, checked (``MessageError``).

    Memory peaks lie in ``[0, MAX_MEMORY_BYTES]``; ``val-examples`` (plateau rule) is an integer
    >= 0 and, when positive, comes with a ``val-accuracy`` in [0, 1].
    """

    stage: int | None = wire("fll-stage", None)
    peak_train_memory: float | None = wire(MEMORY_METRICS[0], None)
    cuda_peak_memory: float | None = wire(MEMORY_METRICS[1], None)
    val_examples: int | None = wire(VAL_EXAMPLES, None)
    val_accuracy: float | None = wire(VAL_ACCURACY, None)

    def check(self) -> None:
        within(MEMORY_METRICS[0], self.peak_train_memory, 0.0, MAX_MEMORY_BYTES)
        within(MEMORY_METRICS[1], self.cuda_peak_memory, 0.0, MAX_MEMORY_BYTES)
        within(VAL_EXAMPLES, self.val_examples, 0, MAX_EXAMPLES)
        if self.val_examples:
            if self.val_accuracy is None:
                raise MessageError(f"{VAL_ACCURACY} missing next to {VAL_EXAMPLES} {self.val_examples}")
            within(VAL_ACCURACY, self.val_accuracy, 0.0, 1.0)


@dataclass
class FLLState(StrategyState):
    """What FLL keeps between rounds (checkpointed; see ``methods.server_state``)."""

    stage: int
    #: the round the current stage started
    stage_start: int
    #: plateau rule: best validation accuracy of the stage, rounds since it last improved
    best_accuracy: float
    stale_evaluations: int
    #: client id -> frozen layers it holds in their final (global) version
    delivered: dict[int, set[str]]
    run_peak: float


class FLLStrategy(LayerwiseStrategy):
    """FLL with depth dropout (Guo et al., https://arxiv.org/abs/2309.05213).

    The model's blocks are trained in stages of ``blocks_per_stage``; stage ``s``:

    1. Clients get the stage's blocks and head, plus frozen blocks they do not hold yet.
    2. Each client trains the stage's blocks and head on the output of the frozen
       prefix, run forward-only, skipping each frozen residual block with
       probability ``p_drop`` (depth dropout); then it re-estimates the stage's
       BatchNorm statistics on full-depth inputs.
    3. The server averages the stage's layers (weighted by examples).
    4. After ``rounds_per_stage`` rounds (or a validation plateau) the stage's
       blocks freeze and the next stage starts; the last stage uses the model's
       own head and runs until the end.

    The plateau rule never looks at the central test set: clients hold out
    ``validation_fraction`` of their training split, score the model they
    receive on it and report ``val-accuracy``; the server follows the
    example-weighted mean of those scores.

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
    stage_head : str
        ``linear`` or ``conv`` (one conv3x3 + BN + ReLU before the linear layer, ``ConvStageHead``).
    stage_steps : str
        ``fixed``: every stage trains ``train.local_steps`` (or epochs) per round;
        ``equal_flops``: a stage whose step is cheaper than the last stage's trains
        proportionally more steps, up to ``MAX_STEP_FACTOR`` times as many
        (``stage_step_flops``), so early stages get more training per round
        at no more compute per round than the last stage.
    checkpoint_activations : bool
        Clients recompute the trained blocks' inner activations in backward
        instead of keeping them: a lower memory peak, the same result, one more
        forward pass of the trained blocks per step.
    p_drop : float
        Probability that a frozen, identity-compatible block is skipped in a local forward pass.
    objective : str
        ``supervised`` (cross-entropy) or ``contrastive`` (SimCLR NT-Xent, the
        stage head as projection; scored by a linear probe).
    temperature : float
        NT-Xent temperature.
    stage_rule : str
        ``fixed`` or ``plateau`` (end a stage after ``plateau_patience``
        rounds without a gain of ``plateau_min_delta`` in validation accuracy).
    plateau_patience : int
        Validated rounds without a gain that end a stage (plateau rule).
    plateau_min_delta : float
        The smallest validation accuracy gain that counts (plateau rule).
    probe_epochs : int
        Full-batch epochs of the linear probes (contrastive: central score, and
        the clients' validation score under the plateau rule).
    validation_fraction : float
        Plateau rule: fraction of each client's training split held out for
        validation, in (0, 1); unused by the fixed rule.
    **base
        ``LayerwiseStrategy`` arguments.
    """

    method = "fll"
    #: Clients keep their whole staged model: frozen blocks are sent only once.
    client_keeps_model = True
    server_state = FLLState

    def __init__(
        self,
        initial_state: State,
        *,
        model: LayeredModel,
        rounds_per_stage: int = 2,
        blocks_per_stage: int = 1,
        head_pool: int = 2,
        stage_head: str = "linear",
        stage_steps: str = "fixed",
        checkpoint_activations: bool = True,
        p_drop: float = 0.0,
        objective: str = "supervised",
        temperature: float = 0.5,
        stage_rule: str = "fixed",
        plateau_patience: int = 2,
        plateau_min_delta: float = 0.005,
        probe_epochs: int = 100,
        validation_fraction: float = 0.1,
        **base: Any,
    ) -> None:
        self.options = FLLOptions(
            rounds_per_stage=rounds_per_stage, blocks_per_stage=blocks_per_stage, head_pool=head_pool,
            stage_head=stage_head, stage_steps=stage_steps, checkpoint_activations=checkpoint_activations,
            p_drop=p_drop, objective=objective, temperature=temperature, stage_rule=stage_rule,
            plateau_patience=plateau_patience, plateau_min_delta=plateau_min_delta, probe_epochs=probe_epochs,
            validation_fraction=validation_fraction,
        )
        model.load_state_dict(numpy_to_torch_state(initial_state))
        self.spec = StageSpec(len(model.blocks), blocks_per_stage)
        self.net = StagedModel(model, self.spec, head_pool, int(base.get("seed", 0)), head=stage_head)
        # Clients start the codec's references from the configured model, without the stage heads.
        super().__init__(torch_state_to_numpy(self.net.state_dict()), codec_reference=initial_state, **base)
        #: the configured model's keys (FedAvg would exchange these: no stage heads)
        self.model_keys = list(initial_state)
        #: per stage: how many times the configured local steps a client trains
        self.step_factors = equal_flops_factors(stage_step_flops(self.net)) if stage_steps == "equal_flops" else None
        self.stage = 0
        self.stage_start = 1
        self.best_accuracy = -1.0
        self.stale_evaluations = 0
        self.round_validation: float | None = None
        self.delivered: dict[int, set[str]] = {}
        self.round_peak: dict[str, float] = {}
        self.run_peak = 0.0

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
        plateaued = self.options.stage_rule == "plateau" and self.stale_evaluations >= self.options.plateau_patience
        if rounds_done >= self.options.rounds_per_stage or (rounds_done > 0 and plateaued):
            self.stage += 1
            self.stage_start = server_round
            self.best_accuracy, self.stale_evaluations = -1.0, 0

    def stage_config(self, train: bool = False) -> StageConfig:
        """What a client needs to build and train the current stage; a training message under
        the plateau rule adds how to hold out and score the validation split."""
        o = self.options
        validate = train and o.stage_rule == "plateau"
        return StageConfig(
            stage=self.stage, blocks_per_stage=self.spec.blocks_per_stage, head_pool=o.head_pool,
            stage_head=o.stage_head, checkpoint=o.checkpoint_activations, p_drop=o.p_drop,
            objective=o.objective, temperature=o.temperature,
            step_factor=self.step_factors[self.stage] if self.step_factors else None,
            validation_fraction=float(o.validation_fraction) if validate else None,
            probe_epochs=o.probe_epochs if validate else None,
        )

    def note_validation(self, accuracy: float) -> None:
        """Plateau rule: count a validated round with or without a gain."""
        if accuracy > self.best_accuracy + self.options.plateau_min_delta:
            self.best_accuracy, self.stale_evaluations = accuracy, 0
        else:
            self.stale_evaluations += 1

    # ------------------------------------------------------------------ hooks
    def start_round(self, server_round: int) -> None:
        self._advance_stage(server_round)
        self.round_validation = None
        self.round_peak = {}  # a round without accepted replies reports no peak

    def plan(self, server_round: int, node_id: int) -> NodePlan:
        """The stage's layers both ways, plus frozen blocks the node does not hold yet."""
        active = set(self.stage_layers(self.stage))
        held = self.delivered.get(self.client_id(node_id), set())
        missing = {name for name in self.frozen_layers(self.stage) if name not in held}
        send = [name for name in self.layers.names if name in active | missing]
        return NodePlan(send=send, request=self.stage_layers(self.stage), config=encode(self.stage_config(train=True)))

    def message_config(self) -> dict[str, ConfigValue]:
        """Every message (evaluation ones too) names the stage."""
        return encode(self.stage_config())

    def validate(self, server_round: int, message: Message) -> TrainReply:
        """Base checks (and, with the plateau rule, a usable validation score); a client
        whose reply is refused may have lost its frozen blocks, so it is sent all of
        them the next time (it refuses to train without them)."""
        try:
            reply = super().validate(server_round, message)
            report = reply_message(StageReport, reply)
            if self.options.stage_rule == "plateau" and report.val_examples is None:
                raise ReplyRejected(reply.node_id, f"{VAL_EXAMPLES} missing (plateau rule)")
            return reply
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
            for key in MEMORY_METRICS
            if any(key in r.metrics for r in replies)
        }
        self.run_peak = max(self.run_peak, self.round_peak.get("peak-train-memory-bytes", 0.0))
        if self.options.stage_rule == "plateau":
            self.round_validation = validation_accuracy(replies)
            if self.round_validation is not None:
                self.note_validation(self.round_validation)
        return self.average_layers(replies, self.stage_layers(self.stage))

    def evaluate_central(self, evaluator: Evaluator) -> dict[str, float]:
        """The prefix up to the current stage with its head (supervised), or a
        linear probe on its features (contrastive: fitted on one half of the
        central test set, scored on the other). Only reported: no stage ends on it."""
        test_set = evaluator.test_set
        self.net.load_state_dict(numpy_to_torch_state(self.global_state))
        if self.options.objective == "supervised":
            stage = self.stage
            result = evaluator.evaluate_module(self.net, forward=lambda x: self.net.forward_stage(x, stage))
        else:
            order = np.random.default_rng(self.seed).permutation(len(test_set))
            half = len(order) // 2
            result = linear_probe(
                self.net, self.stage, test_set.subset(np.sort(order[:half])), test_set.subset(np.sort(order[half:])),
                epochs=self.options.probe_epochs, seed=self.seed,
            )
            result["linear-probe-accuracy"] = result["accuracy"]
        return {**result, "stage": float(self.stage)}

    def fedavg_state(self) -> State:
        """The configured model: FedAvg has no stage heads."""
        return {key: self.global_state[key] for key in self.model_keys}

    def round_record(self, server_round: int) -> dict[str, Any]:
        validation = (
            {VAL_ACCURACY: self.round_validation, "stale-validations": self.stale_evaluations}
            if self.options.stage_rule == "plateau" else {}
        )
        return {
            **validation,
            "stage": self.stage,
            "stage-blocks": list(self.spec.blocks(self.stage)),
            "frozen-layers-sent": sum(
                len(set(plan.send) - set(plan.request)) for plan in self.plans.values()
            ),
            **self.round_peak,
            "peak-train-memory-bytes-run": self.run_peak,
        }

    def summary(self) -> None:
        """Log the method's own settings, then the base strategy's (as Flower's strategies do)."""
        log(
            INFO, "\t└──> %d stages of %d block(s), %d rounds each (%s), p_drop=%.2f, %s objective",
            self.spec.num_stages, self.spec.blocks_per_stage, self.options.rounds_per_stage, self.options.stage_rule,
            self.options.p_drop, self.options.objective,
        )
        super().summary()


def validation_accuracy(replies: list[TrainReply]) -> float | None:
    """The replies' validation accuracy weighted by their validation examples
    (None: no reply held any out)."""
    scored = [(r.metrics[VAL_ACCURACY], r.metrics[VAL_EXAMPLES]) for r in replies if r.metrics.get(VAL_EXAMPLES, 0.0) > 0]
    total = sum(examples for _, examples in scored)
    return math.fsum(accuracy * examples for accuracy, examples in scored) / total if total else None


# --- client half ----------------------------------------------------------------
def equal_flops_factors(step_flops: list[float]) -> list[int]:
    """Per stage, the local-step multiple that brings its round's compute up to the last
    stage's: ``round(last / own)`` step FLOPs, between 1 and ``MAX_STEP_FACTOR``."""
    return [min(MAX_STEP_FACTOR, max(1, round(step_flops[-1] / flops))) for flops in step_flops]


def stage_config_of(content: RecordDict) -> StageConfig:
    """The server's ``stage_config`` of a message."""
    return decode(StageConfig, content[CONFIG])


def staged_model(runtime: ClientRuntime, config: StageConfig) -> tuple[StagedModel, Callable[[], State]]:
    """A staged model for this run as built (same initial values as the server's), and a
    function giving that initial state; in a warm worker the run's kept one
    (``ClientRuntime.built``), keyed by everything its structure and initial values follow from."""

    def build() -> StagedModel:
        model = runtime.new_model()
        spec = StageSpec(len(model.blocks), config.blocks_per_stage)
        return StagedModel(
            model, spec, config.head_pool, int(runtime.cfg.seed), checkpoint=config.checkpoint, head=config.stage_head
        )

    key = ("staged", config.blocks_per_stage, config.head_pool, config.stage_head, config.checkpoint, int(runtime.cfg.seed))
    return runtime.built(key, build)


def _node_state(
    net: StagedModel, initial: Callable[[], State], content: RecordDict, context: Context, stage: int
) -> State:
    """What this node kept (frozen blocks received earlier), overwritten by what arrived;
    ``initial()`` (the model as built) stands in for what it did not keep.

    A node that kept nothing (it restarted without a state folder) must not
    train on freshly initialised frozen blocks: it refuses, the server sees the
    error reply and sends it every frozen block the next time.
    """
    received = received_state(content)
    local = load_local_model(context)
    if local is None or local.keys() != net.state_dict().keys():
        local = initial()
        layers = ModelLayers.from_state(local)
        frozen = frozen_layer_names(net.spec, layers.names, stage)
        missing = [name for name in frozen if not set(layers[name].keys) <= received.keys()]
        if missing:
            raise RuntimeError(f"this node holds no copy of the frozen layers {missing} (restarted without a state folder?)")
    return merge(local, received)


def client_validation_seed(runtime: ClientRuntime) -> int:
    """Seeds a client's validation hold-out: fixed for the run, so it is never trained on."""
    return zlib.crc32(f"{runtime.cfg.seed}:fll-validation:{runtime.partition_id}".encode())


def validation_split(data: ArrayDataset, fraction: float, seed: int) -> tuple[ArrayDataset, ArrayDataset]:
    """``(train, validation)``: a seeded ``fraction`` of ``data`` (at least one
    example, and at least one left to train on) held out."""
    count = min(max(round(fraction * len(data)), 1), len(data) - 1) if len(data) > 1 else 0
    order = np.random.default_rng(seed).permutation(len(data))
    return data.subset(np.sort(order[count:])), data.subset(np.sort(order[:count]))


def validation_score(
    net: StagedModel, stage: int, objective: str, train: ArrayDataset, validation: ArrayDataset,
    probe_epochs: int, seed: int, device: torch.device,
) -> dict[str, float]:
    """``val-accuracy`` and ``val-examples`` of ``net`` at ``stage``: its head's
    accuracy (supervised), or that of a linear probe on its features fitted on
    ``train`` (contrastive, whose stage head is a projection)."""
    if len(validation) == 0:
        return {VAL_EXAMPLES: 0.0}
    if objective == "supervised":
        result = evaluate(net, validation, device, forward=lambda x: net.forward_stage(x, stage))
    else:
        result = linear_probe(net.cpu(), stage, train, validation, epochs=probe_epochs, seed=seed)
    return {VAL_ACCURACY: result["accuracy"], VAL_EXAMPLES: float(len(validation))}


def train_stage(
    net: StagedModel, stage: int, runtime: ClientRuntime, seed: int, p_drop: float, objective: str, temperature: float,
    data: ArrayDataset | None = None, step_factor: int = 1,
) -> dict[str, float]:
    """One round of local training of ``stage`` on ``data`` (default: the runtime's
    training split), ``step_factor`` times the configured steps; the first step's memory is measured.

    Returns ``train-loss``, ``local-steps``, ``dropped-blocks`` (mean skipped
    frozen blocks per step) and ``peak-train-memory-bytes`` (see ``memory``):
    the peak over the first step, which also allocates the optimiser state.
    """
    data = runtime.train_data if data is None else data
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    device = runtime.device
    net.to(device)
    params = net.prepare(stage)
    loss_fn = nn.CrossEntropyLoss()
    running = [*(net.blocks[b] for b in range(net.spec.blocks(stage).stop)), net.stage_head(stage)]
    dropped = 0

    def batch_loss(x: Tensor, y: Tensor) -> Tensor:
        nonlocal dropped
        skip = net.sample_skips(stage, p_drop, generator)
        dropped += len(skip)
        if objective == "supervised":
            return loss_fn(net.forward_stage(x, stage, skip), y)
        first, second = augment_pair(x, generator)
        # The stage's head serves as SimCLR's projection head.
        return nt_xent(net.forward_stage(torch.cat([first, second]), stage, skip), temperature)

    train = runtime.cfg.train
    if step_factor != 1:
        train = OmegaConf.merge(train, {"local_steps": step_factor * num_local_steps(train, len(data))})
    metrics = train_steps(
        net, data, train, device, seed, params=params, batch_loss=batch_loss, rng=rng,
        measure=lambda step, x, y: measure_step(step, resident_tensors(running, x, y), device),
    )
    if p_drop > 0.0:
        recalibrate_batch_norm(net, stage, data, int(runtime.cfg.train.batch_size), rng, device)
    return {**metrics, "dropped-blocks": dropped / metrics["local-steps"]}


def fll_train(runtime: ClientRuntime, content: RecordDict, context: Context) -> RecordDict:
    """Train the stage named by the server; keep the model if asked; return the stage's layers.

    Under the plateau rule the node first scores the model it received on a
    held-out part of its training split, then trains on the rest.
    """
    stage_config = stage_config_of(content)
    stage, objective = stage_config.stage, stage_config.objective
    net, initial = staged_model(runtime, stage_config)
    runtime.load(net, _node_state(net, initial, content, context, stage))
    train = runtime.train_data
    metrics: dict[str, float] = {}
    if stage_config.validation_fraction is not None and stage_config.probe_epochs is not None:
        holdout_seed = client_validation_seed(runtime)
        train, validation = validation_split(train, stage_config.validation_fraction, holdout_seed)
        metrics = validation_score(
            net, stage, objective, train, validation, stage_config.probe_epochs, holdout_seed, runtime.device
        )
    seed = runtime.round_seed(server_round_of(content))
    metrics.update(
        train_stage(
            net, stage, runtime, seed, stage_config.p_drop, objective, stage_config.temperature,
            data=train, step_factor=stage_config.step_factor or 1,
        )
    )
    state = torch_state_to_numpy(net.state_dict())
    keep_if_asked(content, context, state)
    if objective == "supervised":
        local = evaluate(net, runtime.test_data, runtime.device, forward=lambda x: net.forward_stage(x, stage))
        metrics.update({"local-test-accuracy": local["accuracy"], "local-test-loss": local["loss"]})
    metrics.update({NUM_EXAMPLES: float(len(train)), PARTITION_ID: float(runtime.partition_id)})
    metrics.update(encode_metrics(StageReport(
        stage=stage, peak_train_memory=metrics.get(MEMORY_METRICS[0]), cuda_peak_memory=metrics.get(MEMORY_METRICS[1]),
        val_examples=int(metrics[VAL_EXAMPLES]) if VAL_EXAMPLES in metrics else None, val_accuracy=metrics.get(VAL_ACCURACY),
    )))
    return reply_content(state, ModelLayers.from_state(state), requested_layers(content), metrics)


def fll_evaluate(runtime: ClientRuntime, content: RecordDict, context: Context) -> RecordDict:
    """Evaluate the received staged model at its stage on the local test split."""
    stage_config = stage_config_of(content)
    stage = stage_config.stage
    net, initial = staged_model(runtime, stage_config)
    runtime.load(net, _node_state(net, initial, content, context, stage))
    forward = lambda x: net.forward_stage(x, stage)  # noqa: E731
    return RecordDict({METRICS: MetricRecord(evaluate(net, runtime.test_data, runtime.device, forward=forward))})


# --- staged-model helpers: BatchNorm recalibration (client), linear probe (both sides) ---------
#: Full-depth batches ``recalibrate_batch_norm`` estimates the statistics from.
RECALIBRATION_BATCHES = 8


@torch.no_grad()
def recalibrate_batch_norm(
    net: StagedModel, stage: int, dataset: ArrayDataset, batch_size: int, rng: np.random.Generator, device: torch.device
) -> None:
    """Re-estimate the stage's BatchNorm running statistics on full-depth inputs.

    The statistics are reset and re-averaged (cumulative mean, as in
    stochastic-depth and supernet BN calibration) over up to
    ``RECALIBRATION_BATCHES`` forward-only, full-depth batches.
    """
    norms = [
        m for module in net.active_modules(stage) for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    for count, (x, _) in enumerate(minibatches(dataset, batch_size, rng, device)):
        if count >= RECALIBRATION_BATCHES:
            break
        net.forward_stage(x, stage)  # the stage head too: a conv head has BatchNorm
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum


@torch.no_grad()
def linear_probe(
    net: StagedModel, stage: int, train_set: ArrayDataset, test_set: ArrayDataset, epochs: int = 50, seed: int = 0
) -> dict[str, float]:
    """Linear-probe accuracy of the frozen features after ``stage``.

    A logistic-regression head is fitted (full-batch Adam) on the pooled
    features of ``train_set`` and scored on ``test_set``.
    """
    net.eval()

    def embed(data: ArrayDataset) -> Tensor:
        chunks = [
            stage_features(net.features(torch.from_numpy(data.x[i : i + 500]), stage), net.pool)
            for i in range(0, len(data), 500)
        ]
        return torch.cat(chunks)

    train_z, test_z = embed(train_set), embed(test_set)
    mean, std = train_z.mean(0), train_z.std(0) + 1e-6
    train_z, test_z = (train_z - mean) / std, (test_z - mean) / std
    train_y, test_y = torch.from_numpy(train_set.y), torch.from_numpy(test_set.y)
    torch.manual_seed(seed)
    probe = nn.Linear(train_z.shape[1], int(max(train_set.num_classes, int(train_y.max()) + 1)))
    optimizer = torch.optim.Adam(probe.parameters(), lr=0.01, weight_decay=1e-4)
    with torch.enable_grad():
        for _ in range(epochs):
            optimizer.zero_grad()
            F.cross_entropy(probe(train_z), train_y).backward()
            optimizer.step()
    logits = probe(test_z)
    return {
        "accuracy": float((logits.argmax(1) == test_y).float().mean()),
        "loss": float(F.cross_entropy(logits, test_y)),
        "num-examples": float(len(test_set)),
    }
