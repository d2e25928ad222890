"""Client half of federated layer-wise learning (FLL) with depth dropout.

ALGORITHMS.md section 5. Training runs in stages; stage ``s`` trains a group
of consecutive blocks (``blocks_per_stage`` of them) plus a small *stage
head* on top of them. Blocks before the group are frozen: they run in eval
mode under ``torch.no_grad()``, so no activation is kept for backward through
them, and each identity-compatible one is skipped with probability
``p_drop`` (depth dropout). Blocks after the group do not run. In the last
stage the group ends with the model's last block and the stage head is the
model's own head. After a round with depth dropout the stage's BatchNorm
statistics are re-estimated on full-depth inputs (``recalibrate_batch_norm``),
since evaluation and later stages always run every block.

Stage heads are not part of the model, but they are trained and averaged like
any layer, so the global state of an FLL run is the model's state plus
``stage_heads.<s>.weight`` / ``.bias`` for each stage but the last.
``StagedModel`` holds the model's blocks, its head and the stage heads under
exactly those names, so its state dict *is* that global state.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import Context, MetricRecord, RecordDict
from omegaconf import DictConfig
from torch import Tensor, nn

from fedlayer.client.contrastive import augment_pair, nt_xent
from fedlayer.client.memory import measure_step, resident_tensors
from fedlayer.client.runtime import ClientRuntime
from fedlayer.client.state import load_local_model, save_local_model
from fedlayer.client.training import make_optimizer, minibatches, num_local_steps
from fedlayer.data import ArrayDataset
from fedlayer.layers import ModelLayers, State, from_arrayrecord, merge, numpy_to_torch_state, select, to_arrayrecord, torch_state_to_numpy
from fedlayer.models import LayeredModel

#: Objectives: cross-entropy on labels, or SimCLR's NT-Xent on two views.
OBJECTIVES = ("supervised", "contrastive")


@dataclass(frozen=True)
class StageSpec:
    """How blocks are grouped into stages."""

    num_blocks: int
    blocks_per_stage: int = 1

    @property
    def num_stages(self) -> int:
        return math.ceil(self.num_blocks / self.blocks_per_stage)

    def blocks(self, stage: int) -> range:
        """Indices of the blocks trained in ``stage``."""
        if not 0 <= stage < self.num_stages:
            raise ValueError(f"stage must be in [0, {self.num_stages}), got {stage}")
        start = stage * self.blocks_per_stage
        return range(start, min(start + self.blocks_per_stage, self.num_blocks))

    def is_last(self, stage: int) -> bool:
        return stage == self.num_stages - 1


def stage_features(x: Tensor, pool: int) -> Tensor:
    """What a stage head sees: the block output average-pooled to ``pool`` x ``pool``
    (0: not pooled), flattened."""
    if pool > 0 and x.dim() == 4:
        x = F.adaptive_avg_pool2d(x, pool)
    return torch.flatten(x, 1)


class StagedModel(nn.Module):
    """A ``LayeredModel``'s blocks and head plus one linear head per non-final stage.

    Parameters
    ----------
    model : LayeredModel
        The configured model (its modules are shared, not copied).
    spec : StageSpec
        Block grouping.
    pool : int
        Spatial size stage heads pool block outputs to (0: flatten as is).
    seed : int
        Seeds the stage heads' initialisation (server and clients agree).
    """

    def __init__(self, model: LayeredModel, spec: StageSpec, pool: int, seed: int) -> None:
        super().__init__()
        if spec.num_blocks != len(model.blocks):
            raise ValueError(f"spec has {spec.num_blocks} blocks, model {len(model.blocks)}")
        self.blocks = model.blocks
        self.head = model.head
        self.spec = spec
        self.pool = pool
        heads = []
        with torch.random.fork_rng(devices=[]):  # leave the caller's stream (and CUDA's) alone
            torch.default_generator.manual_seed(seed)
            for stage in range(spec.num_stages - 1):
                shape = model.block_output_shape(spec.blocks(stage)[-1] + 1)
                features = stage_features(torch.zeros(1, *shape), pool).shape[1]
                heads.append(nn.Linear(features, model.num_classes))
        self.stage_heads = nn.ModuleList(heads)

    def stage_head(self, stage: int) -> nn.Module:
        """The head trained (and evaluated) in ``stage``."""
        return self.head if self.spec.is_last(stage) else self.stage_heads[stage]

    def active_modules(self, stage: int) -> list[nn.Module]:
        """The modules trained in ``stage``: its blocks and its head."""
        return [*(self.blocks[b] for b in self.spec.blocks(stage)), self.stage_head(stage)]

    def frozen_blocks(self, stage: int) -> range:
        return range(self.spec.blocks(stage).start)

    def prepare(self, stage: int) -> list[nn.Parameter]:
        """Freeze all but the stage's modules; returns the parameters to train."""
        self.eval()
        self.requires_grad_(False)
        params: list[nn.Parameter] = []
        for module in self.active_modules(stage):
            module.train()
            module.requires_grad_(True)
            params.extend(module.parameters())
        return params

    def sample_skips(self, stage: int, p_drop: float, generator: torch.Generator) -> set[int]:
        """Frozen, identity-compatible blocks to skip in one forward pass."""
        if p_drop <= 0.0:
            return set()
        candidates = [b for b in self.frozen_blocks(stage) if self.blocks[b].is_identity_compatible]
        draws = torch.rand(len(candidates), generator=generator)
        return {b for b, u in zip(candidates, draws.tolist()) if u < p_drop}

    def features(self, x: Tensor, stage: int, skip: Collection[int] = ()) -> Tensor:
        """Output of the stage's last block: frozen blocks forward-only, then the stage's blocks."""
        with torch.no_grad():
            for b in self.frozen_blocks(stage):
                if b not in skip:
                    x = self.blocks[b](x)
        for b in self.spec.blocks(stage):
            x = self.blocks[b](x)
        return x

    def forward_stage(self, x: Tensor, stage: int, skip: Collection[int] = ()) -> Tensor:
        """Logits of the stage's head on the stage's features."""
        z = self.features(x, stage, skip)
        if self.spec.is_last(stage):
            return self.head(torch.flatten(z, 1))
        return self.stage_heads[stage](stage_features(z, self.pool))


def staged_model(runtime: ClientRuntime, blocks_per_stage: int, pool: int) -> StagedModel:
    """A fresh staged model for this run (same initial values as the server's)."""
    model = runtime.new_model()
    return StagedModel(model, StageSpec(len(model.blocks), blocks_per_stage), pool, int(runtime.cfg.seed))


def stage_layer_names(spec: StageSpec, layer_names: list[str], stage: int) -> list[str]:
    """The layers (of ``layer_names``, in their order) trained in ``stage``:
    its blocks' and its head's."""
    head = "head." if spec.is_last(stage) else f"stage_heads.{stage}."
    prefixes = (*(f"blocks.{b}." for b in spec.blocks(stage)), head)
    return [name for name in layer_names if f"{name}.".startswith(prefixes)]


def frozen_layer_names(spec: StageSpec, layer_names: list[str], stage: int) -> list[str]:
    """The layers of the blocks frozen in ``stage`` (all blocks before it)."""
    prefixes = tuple(f"blocks.{b}." for b in range(spec.blocks(stage).start))
    return [name for name in layer_names if f"{name}.".startswith(prefixes)]


def train_stage(
    net: StagedModel,
    stage: int,
    dataset: ArrayDataset,
    train: DictConfig,
    device: torch.device,
    seed: int,
    *,
    p_drop: float = 0.0,
    objective: str = "supervised",
    temperature: float = 0.5,
) -> dict[str, float]:
    """One round of local training of ``stage``; the first step's memory is measured.

    Returns ``train-loss``, ``local-steps``, ``dropped-blocks`` (mean skipped
    frozen blocks per step) and ``peak-train-memory-bytes`` (see ``memory``):
    the peak over the first step, which also allocates the optimiser state.
    """
    if len(dataset) == 0:
        raise ValueError("client has no training examples")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    net.to(device)
    params = net.prepare(stage)
    optimizer = make_optimizer(params, train)
    loss_fn = nn.CrossEntropyLoss()
    steps = num_local_steps(train, len(dataset))
    running = [*(net.blocks[b] for b in range(net.spec.blocks(stage).stop)), net.stage_head(stage)]
    total_loss, dropped, done = 0.0, 0, 0
    metrics: dict[str, float] = {}

    while done < steps:
        for x, y in minibatches(dataset, int(train.batch_size), rng, device):
            skip = net.sample_skips(stage, p_drop, generator)

            def step() -> Tensor:
                optimizer.zero_grad(set_to_none=True)
                if objective == "supervised":
                    loss = loss_fn(net.forward_stage(x, stage, skip), y)
                else:
                    first, second = augment_pair(x, generator)
                    views = torch.cat([first, second])
                    # The stage's head serves as SimCLR's projection head.
                    loss = nt_xent(net.forward_stage(views, stage, skip), temperature)
                loss.backward()
                optimizer.step()
                return loss.detach()

            if done == 0:
                loss, metrics = measure_step(step, resident_tensors(running, x, y), device)
            else:
                loss = step()
            total_loss += float(loss)
            dropped += len(skip)
            done += 1
            if done >= steps:
                break
    if p_drop > 0.0:
        recalibrate_batch_norm(net, stage, dataset, int(train.batch_size), rng, device)
    return {**metrics, "train-loss": total_loss / steps, "local-steps": float(steps), "dropped-blocks": dropped / steps}


#: Full-depth batches ``recalibrate_batch_norm`` estimates the statistics from.
RECALIBRATION_BATCHES = 8


@torch.no_grad()
def recalibrate_batch_norm(
    net: StagedModel, stage: int, dataset: ArrayDataset, batch_size: int, rng: np.random.Generator, device: torch.device
) -> None:
    """Re-estimate the stage's BatchNorm running statistics on full-depth inputs.

    With depth dropout the stage's blocks mostly see the outputs of shortened
    frozen prefixes, so the running statistics they learn while training
    describe those, while evaluation (and the next stage) always runs the full
    prefix. The statistics are reset and re-averaged (cumulative mean, as in
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
        net.features(x, stage)
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum


@torch.no_grad()
def evaluate_stage(net: StagedModel, stage: int, dataset: ArrayDataset, device: torch.device, batch_size: int = 500) -> dict[str, float]:
    """Loss and accuracy of the prefix up to ``stage`` with the stage's head."""
    if len(dataset) == 0:
        return {"loss": float("nan"), "accuracy": float("nan"), "num-examples": 0.0}
    net.to(device).eval()
    total_loss, correct = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        x = torch.from_numpy(dataset.x[start : start + batch_size]).to(device)
        y = torch.from_numpy(dataset.y[start : start + batch_size]).to(device)
        logits = net.forward_stage(x, stage)
        total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(dim=1) == y).sum())
    return {"loss": total_loss / len(dataset), "accuracy": correct / len(dataset), "num-examples": float(len(dataset))}


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


def _stage_config(content: RecordDict) -> tuple[int, int, int, float, str, float]:
    config = content["config"]
    return (
        int(config["fll-stage"]),
        int(config["fll-blocks-per-stage"]),
        int(config["fll-head-pool"]),
        float(config["fll-p-drop"]),
        str(config["fll-objective"]),
        float(config["fll-temperature"]),
    )


def _node_state(net: StagedModel, content: RecordDict, context: Context, stage: int) -> State:
    """What this node kept (frozen blocks received earlier), overwritten by what arrived.

    A node that kept nothing (it restarted without a state folder) must not
    train on freshly initialised frozen blocks: it refuses, the server sees the
    error reply and sends it every frozen block the next time.
    """
    received = from_arrayrecord(content["arrays"]) if "arrays" in content else {}
    local = load_local_model(context)
    if local is None or local.keys() != net.state_dict().keys():
        local = torch_state_to_numpy(net.state_dict())
        layers = ModelLayers.from_state(local)
        frozen = frozen_layer_names(net.spec, layers.names, stage)
        missing = [name for name in frozen if not set(layers[name].keys) <= received.keys()]
        if missing:
            raise RuntimeError(f"this node holds no copy of the frozen layers {missing} (restarted without a state folder?)")
    return merge(local, received)


def fll_train(runtime: ClientRuntime, content: RecordDict, context: Context) -> RecordDict:
    """Train the stage named by the server; keep the model; return the stage's layers."""
    server_round = int(content["config"]["server-round"])
    stage, blocks_per_stage, pool, p_drop, objective, temperature = _stage_config(content)
    net = staged_model(runtime, blocks_per_stage, pool)
    net.load_state_dict(numpy_to_torch_state(_node_state(net, content, context, stage)))
    metrics = train_stage(
        net, stage, runtime.train_data, runtime.cfg.train, runtime.device, runtime.round_seed(server_round),
        p_drop=p_drop, objective=objective, temperature=temperature,
    )
    state = torch_state_to_numpy(net.state_dict())
    save_local_model(context, state)
    if objective == "supervised":
        local = evaluate_stage(net, stage, runtime.test_data, runtime.device)
        metrics.update({"local-test-accuracy": local["accuracy"], "local-test-loss": local["loss"]})
    metrics.update(
        {
            "num-examples": float(len(runtime.train_data)),
            "partition-id": float(runtime.partition_id),
            "fll-stage": float(stage),
        }
    )
    requested = [name for name in content["config"].get("request", []) if name]
    reply = RecordDict({"metrics": MetricRecord(metrics)})
    if requested:
        reply["arrays"] = to_arrayrecord(select(state, ModelLayers.from_state(state), requested))
    return reply


def fll_evaluate(runtime: ClientRuntime, content: RecordDict, context: Context) -> RecordDict:
    """Evaluate the received staged model at its stage on the local test split."""
    stage, blocks_per_stage, pool, *_ = _stage_config(content)
    net = staged_model(runtime, blocks_per_stage, pool)
    net.load_state_dict(numpy_to_torch_state(_node_state(net, content, context, stage)))
    return RecordDict({"metrics": MetricRecord(evaluate_stage(net, stage, runtime.test_data, runtime.device))})
