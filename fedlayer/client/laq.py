"""LAQ's client half: compute the round's "gradient", test the lazy rule, upload codes.

The skip bound is ``drift_scale * drift + ERROR_WEIGHT[mode] * (e + ehat)``:
the paper's rule in ``gradient`` mode, the drift term alone in ``delta`` mode
(why: ``fedlayer.strategies.laq``).

Per node, ``context.state`` keeps (see ``fedlayer.strategies.laq`` for the protocol):

- ``laq-qhat`` (ArrayRecord): ``Qhat``, the last quantized gradient uploaded,
  one float32 tensor per model key (absent: all zeros);
- ``laq`` (ConfigRecord): ``ehat`` (its squared quantization error), ``clock``
  (rounds since the last upload) and ``version`` (uploads the server accepted
  as far as this client knows; the base the next innovation is relative to).

The server's plan (``config``) carries ``laq-mode``, ``laq-bits``, ``laq-tbar``,
``laq-l2``, ``laq-batch-size``, the drift scalar ``laq-drift`` =
``sum_d xi_d ||theta^{k+1-d} - theta^{k-d}||^2``, its factor ``laq-drift-scale``
= ``1 / (alpha^2 M^2)`` and ``laq-version``, the server's upload count for this
client (-1 when it does not know this node yet). When the server's version
differs from the client's, ``Qhat`` is not what the server holds (a lost or
rejected upload, a restarted client): the client restarts from ``Qhat = 0``,
base version 0, and uploads unconditionally; the server then replaces its copy.

The reply has no ``arrays``: the encoded ``CompressedUpdate`` travels as bytes
in the ``payload`` ConfigRecord (``laq-update``, plus ``laq-base``: the version
it was quantized against), so the ByteLedger counts it as model payload.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from torch import nn

from fedlayer.client.runtime import ClientRuntime
from fedlayer.client.state import load_memory, save_memory
from fedlayer.client.training import train_steps
from fedlayer.compression import EncodedTensor, LAQCodec, innovation_norm_sq
from fedlayer.data import ArrayDataset
from fedlayer.layers import State, from_arrayrecord, to_arrayrecord, torch_state_to_numpy
from fedlayer.proto.wire import encode_update

QHAT = "laq-qhat"
MEMORY = "laq"
UPDATE_KEY = "laq-update"
BASE_KEY = "laq-base"
#: Weight of the quantization errors ``e + ehat`` in the skip bound, per mode:
#: the paper's 3 for gradients; 0 for model deltas, whose quantization error
#: does not vanish, so the allowance would let stale deltas be re-applied forever.
ERROR_WEIGHT = {"gradient": 3.0, "delta": 0.0}


@dataclass(frozen=True)
class LazyDecision:
    """Outcome of the lazy rule for one round's gradient ``g``.

    ``q`` is the new quantized gradient ``Q`` (what the server rebuilds), ``error``
    ``e = ||Q - g||^2``, ``innovation`` ``||Q - Qhat||^2`` and ``threshold`` its
    bound; ``tensors`` are the encoded tensors (sent only when ``upload``).
    """

    upload: bool
    q: State
    tensors: list[EncodedTensor]
    error: float
    innovation: float
    threshold: float


def lazy_decision(
    g: State,
    qhat: State,
    *,
    bits: int,
    ehat: float,
    clock: int,
    tbar: int,
    drift: float,
    drift_scale: float,
    error_weight: float = ERROR_WEIGHT["gradient"],
    force: bool = False,
) -> LazyDecision:
    """Quantize ``g`` around ``qhat`` and apply LAQ's upload rule.

    Upload iff ``||Q - Qhat||^2 >= drift_scale * drift + error_weight (e + ehat)``
    (``error_weight`` 3 is the paper's rule), or the clock reached ``tbar``, or
    ``force``. Keys are taken in ``g``'s order.
    """
    codec = LAQCodec()
    tensors: list[EncodedTensor] = []
    q: State = {}
    error = innovation = 0.0
    for key, value in g.items():
        enc, q_key = codec.encode(key, value, qhat[key], bits)
        assert enc.report is not None
        tensors.append(enc)
        q[key] = q_key
        error += enc.report.squared_error
        innovation += innovation_norm_sq(q_key, qhat[key])
    threshold = drift_scale * drift + error_weight * (error + ehat)
    upload = force or clock >= tbar or innovation >= threshold
    return LazyDecision(upload, q, tensors, error, innovation, threshold)


def full_gradient(
    model: nn.Module, data: ArrayDataset, l2: float, batch_size: int, seed: int, device: torch.device
) -> tuple[State, float]:
    """Gradient of ``mean CE loss + l2/2 ||theta||^2`` at the model's parameters.

    ``batch_size`` 0 (or >= the split) uses the whole training split (LAQ);
    otherwise one seeded minibatch of that size (SLAQ). Returns (gradient, loss).
    """
    model.to(device).train()
    if 0 < batch_size < len(data):
        idx = np.sort(np.random.default_rng(seed).choice(len(data), size=batch_size, replace=False))
        x, y = data.x[idx], data.y[idx]
    else:
        x, y = data.x, data.y
    model.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(torch.from_numpy(x).to(device)), torch.from_numpy(y).to(device))
    if l2 > 0:
        loss = loss + 0.5 * l2 * sum((p * p).sum() for p in model.parameters())
    loss.backward()
    grads = {name: p.grad.detach().cpu().numpy().astype(np.float32) for name, p in model.named_parameters()}
    return grads, float(loss.detach())


def laq_train(runtime: ClientRuntime, content: RecordDict, context: Context) -> RecordDict:
    """One LAQ round: gradient (or model delta) at the received model, lazy upload."""
    config = content["config"]
    server_round = int(config["server-round"])
    mode = str(config["laq-mode"])
    theta = from_arrayrecord(content["arrays"])
    model = runtime.model_with(theta)
    seed = runtime.round_seed(server_round)
    if mode == "gradient":
        g, loss = full_gradient(
            model, runtime.train_data, float(config["laq-l2"]), int(config["laq-batch-size"]), seed, runtime.device
        )
        missing = set(theta) - set(g)
        if missing:  # buffers (BatchNorm statistics) are not gradients; the server refuses such models
            raise ValueError(f"LAQ gradient mode needs every state tensor to be a parameter; buffers {sorted(missing)}")
        g = {key: g[key] for key in theta}
    else:
        loss = train_steps(model, runtime.train_data, runtime.cfg.train, runtime.device, seed)["train-loss"]
        local = torch_state_to_numpy(model.state_dict())
        # The descent direction: with alpha = 1/M the server step is the mean model delta.
        g = {key: np.subtract(theta[key], local[key], dtype=np.float32) for key in theta}

    memory = load_memory(context, MEMORY)
    version = int(memory["version"]) if memory is not None else 0
    ehat = float(memory["ehat"]) if memory is not None else 0.0
    clock = int(memory["clock"]) if memory is not None else 0
    stored = context.state.array_records.get(QHAT)
    qhat = from_arrayrecord(stored) if isinstance(stored, ArrayRecord) and version > 0 else None
    server_version = int(config["laq-version"])
    resync = qhat is None or (server_version >= 0 and server_version != version)
    if resync:
        qhat = {key: np.zeros_like(value) for key, value in g.items()}
        version, ehat = 0, 0.0

    decision = lazy_decision(
        g, qhat, bits=int(config["laq-bits"]), ehat=ehat, clock=clock, tbar=int(config["laq-tbar"]),
        drift=float(config["laq-drift"]), drift_scale=float(config["laq-drift-scale"]),
        error_weight=ERROR_WEIGHT[mode], force=resync,
    )
    base = version
    if decision.upload:
        data = encode_update(decision.tensors, skip=False, clock=clock, quantization_error=decision.error)
        context.state[QHAT] = to_arrayrecord(decision.q)
        ehat, clock, version = decision.error, 0, version + 1
    else:
        data = encode_update([], skip=True, clock=clock, quantization_error=0.0)
        clock += 1
    save_memory(context, MEMORY, ConfigRecord({"version": version, "ehat": ehat, "clock": clock}))

    metrics = {
        **runtime.reply_metrics(model),  # gradient mode: the model is still theta
        "train-loss": loss,
        "laq-upload": float(decision.upload),
        "laq-innovation": decision.innovation,
        "laq-threshold": decision.threshold,
    }
    return RecordDict(
        {"metrics": MetricRecord(metrics), "payload": ConfigRecord({UPDATE_KEY: data, BASE_KEY: base})}
    )
