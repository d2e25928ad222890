"""FedLP's client half: pruned local training, depth sub-models, FLOP counts.

Homogeneous scheme: the server names the layers this client keeps in
``request`` (see ``fedlayer.strategies.fedlp``); the client trains and uploads
only those. With ``freeze-dropped`` the other layers' parameters get
``requires_grad=False``, so their weight gradients are never computed: the
client then trains only what it uploads (a layer it drops would be
overwritten by the next download anyway, so its local update is wasted work;
the forward pass still uses it, and BatchNorm running statistics of a frozen
BN still move in training mode). It is off by default because it costs
accuracy: a client then fits its kept layers to the old values of layers
that other clients update in the same round (see ``conf/strategy/fedlp.yaml``).

Heterogeneous scheme: a level-c client trains the first c blocks followed by
the level-c head (the model's own ``head`` at full depth, else a linear
classifier on the flattened block-c output that the server sends along) and
returns exactly those layers. A node config ``depth-level`` caps the level the
server planned (a weak device); the reply's ``depth-level`` metric tells the
server which level was trained.

Both schemes report ``train-flops`` (FLOPs of one training step, forward +
loss + backward, counted with ``torch.utils.flop_counter.FlopCounterMode`` on
a full batch, times the number of local steps) and ``train-flops-full``, the
same for the full model: what FedAvg would have computed.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from flwr.app import Context, MetricRecord, RecordDict
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from fedlayer.client.runtime import ClientRuntime
from fedlayer.client.state import load_local_model, save_local_model
from fedlayer.client.training import num_local_steps, train_steps
from fedlayer.layers import (
    State,
    from_arrayrecord,
    merge,
    numpy_to_torch_state,
    select,
    to_arrayrecord,
    torch_state_to_numpy,
)
from fedlayer.models import LayeredModel

#: State-dict prefix of the per-level heads (``level-heads.<c>.weight``/``.bias``).
LEVEL_HEAD_PREFIX = "level-heads."
HOMOGENEOUS = "homogeneous"
HETEROGENEOUS = "heterogeneous"


def level_head_name(level: int) -> str:
    """Layer name of the head of depth ``level`` (below full depth)."""
    return f"{LEVEL_HEAD_PREFIX}{level}"


def block_index(name: str) -> int | None:
    """Index of the block a layer belongs to (``blocks.<i>.*``); None for head layers."""
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "blocks" and len(parts) > 1 and parts[1].isdigit() else None


def level_layers(names: list[str], level: int, depth: int) -> list[str]:
    """Layers of a level-``level`` sub-model: its blocks, then the model's head
    at full depth or the level head below it."""
    blocks = [n for n in names if (i := block_index(n)) is not None and i < level]
    if level == depth:
        return blocks + [n for n in names if block_index(n) is None]
    return blocks + [level_head_name(level)]


def init_level_head(model: LayeredModel, level: int, seed: int) -> State:
    """The initial level-``level`` head: a linear classifier on the flattened
    block output, seeded by (``seed``, ``level``) so server and clients agree."""
    features = int(np.prod(model.block_output_shape(level)))
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed * 1009 + level)
        head = nn.Linear(features, model.num_classes)
    name = level_head_name(level)
    return {f"{name}.{key}": value for key, value in torch_state_to_numpy(head.state_dict()).items()}


def level_head_module(state: State, level: int) -> nn.Linear:
    """A linear head loaded from the ``level-heads.<level>.*`` keys of ``state``."""
    name = level_head_name(level)
    weight = state[f"{name}.weight"]
    head = nn.Linear(weight.shape[1], weight.shape[0])
    head.load_state_dict(numpy_to_torch_state({"weight": weight, "bias": state[f"{name}.bias"]}))
    return head


class DepthNet(nn.Module):
    """The first ``level`` blocks of ``model`` followed by ``head``.

    Shares the model's blocks (training updates ``model`` in place); at full
    depth with ``head=None`` it is the model itself.
    """

    def __init__(self, model: LayeredModel, level: int, head: nn.Module | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(model.blocks[:level])
        self.head = model.head if head is None else head

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(torch.flatten(x, 1))


def step_flops(net: nn.Module, x: Tensor, y: Tensor) -> int:
    """FLOPs of one training step (forward, loss, backward) of a copy of ``net``."""
    clone = copy.deepcopy(net).train()
    with FlopCounterMode(display=False) as counter:
        loss = nn.functional.cross_entropy(clone(x), y)
        if loss.requires_grad:
            loss.backward()
    return int(counter.get_total_flops())


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


def fedlp_train(runtime: ClientRuntime, content: RecordDict, context: Context) -> RecordDict:
    """Train the kept layers (homogeneous) or the depth sub-model (heterogeneous)."""
    config = content["config"]
    server_round = int(config["server-round"])
    received = from_arrayrecord(content["arrays"]) if "arrays" in content else {}
    heads = {k: v for k, v in received.items() if k.startswith(LEVEL_HEAD_PREFIX)}
    local = load_local_model(context)
    if local is None:
        local = torch_state_to_numpy(runtime.new_model().state_dict())
    model = runtime.model_with(merge(local, {k: v for k, v in received.items() if k not in heads}))
    request = [name for name in config.get("request", []) if name]
    metrics: dict[str, float] = {}

    if str(config["fedlp-scheme"]) == HOMOGENEOUS:
        net: nn.Module = model
        if bool(config["freeze-dropped"]):
            for key, param in model.named_parameters():
                param.requires_grad_(runtime.layers.layer_of(key) in request)
        upload = request
    else:
        depth = len(model.blocks)
        level = int(config["depth-level"])
        if "depth-level" in context.node_config:
            level = max(1, min(level, int(context.node_config["depth-level"])))
        head = None
        if level < depth:
            name = level_head_name(level)
            if f"{name}.weight" not in heads:  # capped below the planned level
                heads = init_level_head(model, level, int(runtime.cfg.seed))
            head = level_head_module(heads, level).to(runtime.device)
        net = DepthNet(model, level, head)
        upload = [n for n in level_layers(runtime.layers.names, level, depth) if n in runtime.layers]
        metrics["depth-level"] = float(level)

    metrics.update(_train(runtime, net, server_round))
    metrics.update(_flop_metrics(runtime, net, runtime.new_model().to(runtime.device), int(metrics["local-steps"])))
    state = torch_state_to_numpy(model.state_dict())
    save_local_model(context, state)
    metrics.update(runtime.reply_metrics(net))
    reply = RecordDict({"metrics": MetricRecord(metrics)})
    arrays = select(state, runtime.layers, upload)
    if isinstance(net, DepthNet) and net.head is not model.head:
        name = level_head_name(int(metrics["depth-level"]))
        arrays.update({f"{name}.{k}": v for k, v in torch_state_to_numpy(net.head.state_dict()).items()})
    if arrays:
        reply["arrays"] = to_arrayrecord(arrays)
    return reply
