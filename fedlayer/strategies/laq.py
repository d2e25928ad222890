"""LAQ (Sun et al., NeurIPS 2019; ALGORITHMS.md section 4): lazily aggregated quantized gradients.

Every round the server sends the model ``theta`` and the drift scalar
``sum_{d=1..D} xi_d ||theta^{k+1-d} - theta^{k-d}||^2`` (``xi_d = xi / D``).
Client ``m`` computes its gradient ``g`` (``gradient`` mode: the full-batch,
or one minibatch, gradient of its local loss + ``l2/2 ||theta||^2``, the
paper's setting; ``delta`` mode: ``theta - theta_local`` after the configured
local SGD steps), quantizes the innovation ``g - Qhat_m`` with ``bits`` bits
and uploads the bit-packed codes only if the innovation is large against the
bound below (or its clock reached ``tbar``); else it replies with a skip. The
server keeps every client's ``Qhat_m`` and ``grad = sum_m Qhat_m`` and steps
``theta <- theta - alpha * grad`` every round, uploads or not: a skipping
client's last upload stands in for its current ``g``.

The skip bound (client side, ``fedlayer.client.laq.ERROR_WEIGHT``):

- ``gradient``: the paper's ``||Q - Qhat||^2 < drift / (alpha^2 M^2) + 3 (e + ehat)``.
  The ``3 (e + ehat)`` allowance assumes the quantization errors shrink with
  the innovations, as they do for deterministic gradients converging.
- ``delta``: ``||Q - Qhat||^2 < drift / (alpha^2 M^2)``, no allowance. A model
  delta after local minibatch SGD never converges: its innovation stays
  noise-sized, and ``e`` (grid step ``R / (2^b - 1)``, ``R = ||g - Qhat||_inf``)
  grows with it, so ``||Q - Qhat||^2 >= 3 (e + ehat)`` tests only how heavy
  the innovation's tails are, not its size. At b = 4 the CNN's deltas failed
  it at every size: clients skipped until ``tbar`` while the server re-applied
  their stale deltas every round, an error in one fixed direction that adds
  up linearly (fresh quantization errors are independent across rounds), and
  the model drifted off (issue #4). Without it a stale delta is re-applied
  only while it is within the model's recent change of the client's current
  delta.

FedAvg equivalence: in ``delta`` mode with ``alpha = 1/M``, equal client
sizes, nothing skipped (``xi = 0`` makes the bound 0) and near-lossless bits,
each round's step is that round's mean model delta, i.e. FedAvg; in
``gradient`` mode the step is ``alpha * sum_m g_m``, gradient descent with
learning rate ``alpha * M`` on the mean loss (FedAvg with one full-batch
local step and ``train.lr = alpha * M``).

Protocol details beyond the paper:

- Clients are identified by their ``partition-id`` (0..M-1); ``Qhat_m`` is
  keyed by it, and node ids are mapped to it by the identity query
  (``fedlayer.strategies.identity``) and from accepted replies.
- Versions keep the two copies of ``Qhat_m`` equal. The server counts the
  uploads it accepted from each client and sends that count; an upload names
  the version it was quantized against (``laq-base``). A client whose count
  differs (an upload that was lost or rejected, a restarted client, a resumed
  run) restarts from ``Qhat = 0`` with base 0 and uploads; the server accepts
  base 0 (decoded against zeros, replacing its ``Qhat_m``) or its own count,
  and rejects anything else, so a stale base never corrupts the sum.
- Replies carry no dense arrays: the ``CompressedUpdate`` bytes travel in the
  ``payload`` record and are decoded with the model's float tensor names and
  shapes; malformed bytes, bit widths, packed lengths, radii, names or shapes
  (``WireFormatError``), a non-finite decode, an unknown or duplicate
  partition id or a stale base are rejected before any state changes.
- ``grad`` is re-summed from the ``Qhat_m`` in partition order each round
  (exact and order-independent; a running float32 sum would drift).
- A round in which every reply was rejected takes no step.
- Every state tensor must be a trainable float parameter: models with
  BatchNorm statistics or integer counters (cnn6, resnet20) are refused.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.common.logger import log
from flwr.serverapp import Grid
from omegaconf import DictConfig

from fedlayer.client.laq import BASE_KEY, UPDATE_KEY
from fedlayer.compression import LAQCodec
from fedlayer.compression.quantize import squared_distance
from fedlayer.layers import State
from fedlayer.models import build_model
from fedlayer.proto.wire import WireFormatError, decode_update
from fedlayer.strategies.base import LayerwiseStrategy, NodePlan
from fedlayer.strategies.validation import ReplyRejected, TrainReply

MODES = ("gradient", "delta")
#: State-dict suffixes of buffers: statistics, not gradients (refused).
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
#: Bits of the float32 radius sent with each tensor.
RADIUS_BITS = 32


class LAQStrategy(LayerwiseStrategy):
    """Lazily aggregated quantized gradients.

    Parameters
    ----------
    initial_state : State
        The initial global model; every tensor must be a float parameter.
    num_clients : int
        M, the number of clients (partition ids 0..M-1).
    mode : str
        ``gradient`` (one gradient per round) or ``delta`` (local steps; the
        update is the model delta).
    bits : int
        b, bits per quantized coordinate (1..8).
    D : int
        Number of past model changes in the skip threshold.
    xi : float
        Total drift weight ``sum_d xi_d``; each ``xi_d = xi / D`` (0: no skips in ``delta`` mode).
    tbar : int
        A client uploads at the latest after ``tbar`` consecutive skips.
    alpha : float
        Server step: ``theta <- theta - alpha * sum_m Qhat_m``.
    l2 : float
        L2 weight of the local loss in ``gradient`` mode.
    batch_size : int
        ``gradient`` mode: 0 for the full local split, else one minibatch of this size.
    **kwargs
        ``LayerwiseStrategy`` arguments (sampling, seed).
    """

    method = "laq"

    def __init__(
        self,
        initial_state: State,
        *,
        num_clients: int,
        mode: str = "gradient",
        bits: int = 4,
        D: int = 10,
        xi: float = 0.8,
        tbar: int = 100,
        alpha: float = 0.02,
        l2: float = 0.01,
        batch_size: int = 0,
        **kwargs: Any,
    ) -> None:
        from fedlayer.config import ConfigError

        super().__init__(initial_state, **kwargs)
        not_gradients = [
            key for key, value in self.global_state.items()
            if not np.issubdtype(value.dtype, np.floating) or key.endswith(BUFFER_SUFFIXES)
        ]
        if not_gradients:
            raise ConfigError(
                "model.name",
                f"LAQ quantizes gradients of parameters; this model has buffers {not_gradients[:4]} "
                "(BatchNorm): use a model without them (linear, cnn)",
            )
        self.num_clients = num_clients
        self.mode = mode
        self.bits = bits
        self.D = D
        self.xi = xi
        self.tbar = tbar
        self.alpha = alpha
        self.l2 = l2
        self.batch_size = batch_size
        self.shapes = {key: tuple(value.shape) for key, value in self.global_state.items()}
        self.codec = LAQCodec()
        self.qhat: dict[int, State] = {}
        self.versions: dict[int, int] = {}
        self.history: list[float] = []  # ||theta^{k+1-d} - theta^{k-d}||^2, most recent first
        self.client_of_node: dict[int, int] = {}
        self.totals = {"uploads": 0, "skips": 0, "bits_sent": 0}
        self._claimed: tuple[int, set[int]] = (0, set())
        self._record: dict[str, Any] = {}

    # ---------------------------------------------------------- construction
    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        """Ranges of ``strategy.*``; a model with buffers (BatchNorm) is refused as ``model.name``."""
        from fedlayer.config import ConfigError

        s = cfg.strategy
        if s.mode not in MODES:
            raise ConfigError("strategy.mode", f"must be one of {list(MODES)}, got {s.mode!r}")
        for field, low in (("bits", 1), ("D", 1), ("tbar", 1), ("batch_size", 0)):
            value = s[field]
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"strategy.{field}", f"must be an integer >= {low}, got {value!r}")
        if s.bits > 8:
            raise ConfigError("strategy.bits", f"must be in 1..8, got {s.bits}")
        for field, positive in (("alpha", True), ("xi", False), ("l2", False)):
            value = s[field]
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 or (positive and value == 0):
                raise ConfigError(f"strategy.{field}", f"must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
        # A throwaway instance: which buffers a model has does not depend on the input shape.
        probe = build_model(cfg.model.name, input_shape=(3, 32, 32), num_classes=10)
        buffers = [name for name, _ in probe.named_buffers()]
        if buffers:
            raise ConfigError(
                "model.name",
                f"LAQ quantizes gradients of parameters; {cfg.model.name} has buffers {buffers[:4]} (BatchNorm): "
                "use a model without them (linear, cnn)",
            )

    @classmethod
    def method_kwargs(cls, cfg: DictConfig) -> dict[str, Any]:
        s = cfg.strategy
        return {
            "num_clients": int(cfg.federation.num_clients),
            "mode": str(s.mode),
            "bits": int(s.bits),
            "D": int(s.D),
            "xi": float(s.xi),
            "tbar": int(s.tbar),
            "alpha": float(s.alpha),
            "l2": float(s.l2),
            "batch_size": int(s.batch_size),
        }

    # ------------------------------------------------------------------ hooks
    def drift(self) -> float:
        """``sum_{d=1..D} xi_d ||theta^{k+1-d} - theta^{k-d}||^2`` over the steps taken so far."""
        return self.xi / self.D * float(sum(self.history[: self.D]))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._record = self._empty_record()
        return super().configure_train(server_round, arrays, config, grid)

    def plan(self, server_round: int, node_id: int) -> NodePlan:
        """The full model down, nothing dense back; the rule's inputs in the config."""
        client = self.client_of_node.get(node_id, self.client_of.get(node_id))
        return NodePlan(
            send=self.layers.names,
            request=[],
            config={
                "laq-mode": self.mode,
                "laq-bits": self.bits,
                "laq-tbar": self.tbar,
                "laq-l2": self.l2,
                "laq-batch-size": self.batch_size,
                "laq-drift": self.drift(),
                "laq-drift-scale": 1.0 / (self.alpha**2 * self.num_clients**2),
                "laq-version": -1 if client is None else self.versions.get(client, 0),
            },
        )

    def validate(self, server_round: int, message: Message) -> TrainReply:
        """Dense checks (none requested), then decode and check the compressed update.

        On success ``reply.payload`` holds ``client``, ``q`` (the decoded
        ``Q`` per key, or None for a skip), ``base``, ``bits`` and ``error``.
        """
        reply = super().validate(server_round, message)
        node = reply.node_id
        client = reply.metrics.get("partition-id")
        if client is None or not math.isfinite(client) or client != int(client) or not 0 <= client < self.num_clients:
            raise ReplyRejected(node, f"partition-id must be an integer in 0..{self.num_clients - 1}, got {client}")
        client = int(client)
        if self._claimed[0] != server_round:
            self._claimed = (server_round, set())
        if client in self._claimed[1]:
            raise ReplyRejected(node, f"partition-id {client} already replied this round")
        data, base = reply.payload.get(UPDATE_KEY), reply.payload.get(BASE_KEY)
        if not isinstance(data, bytes):
            raise ReplyRejected(node, f"payload {UPDATE_KEY!r} must be bytes, got {type(data).__name__}")
        if not isinstance(base, int) or isinstance(base, bool) or base < 0:
            raise ReplyRejected(node, f"payload {BASE_KEY!r} must be an integer >= 0, got {base!r}")
        try:
            update = decode_update(data, expected=self.shapes)
        except WireFormatError as err:
            raise ReplyRejected(node, f"malformed LAQ update: {err}") from None
        q: State | None = None
        bits = 0
        if not update.skip:
            current = self.versions.get(client, 0)
            if base not in (0, current):
                raise ReplyRejected(node, f"update quantized against version {base}; the server holds {current}")
            reference = self.qhat.get(client) if base else None
            by_name = {t.name: t for t in update.tensors}
            q = {}
            for key, shape in self.shapes.items():
                ref = reference[key] if reference is not None else np.zeros(shape, np.float32)
                value = self.codec.decode(by_name[key], ref)
                if not np.isfinite(value).all():
                    raise ReplyRejected(node, f"{key}: decoded update is not finite")
                q[key] = value
                bits += value.size * by_name[key].bits + RADIUS_BITS
        self._claimed[1].add(client)
        reply.payload = {"client": client, "q": q, "base": base, "bits": bits, "error": update.quantization_error}
        return reply

    def aggregate(self, server_round: int, replies: list[TrainReply]) -> State:
        """Replace the uploaders' ``Qhat_m``, re-sum, step ``theta -= alpha * grad``."""
        record = self._empty_record()
        errors: list[float] = []
        for reply in replies:
            info = reply.payload
            client = info["client"]
            self.client_of_node[reply.node_id] = client
            if info["q"] is None:
                record["skips"] += 1
                continue
            if info["base"] == 0 and self.versions.get(client, 0) > 0:
                record["resyncs"] += 1
            self.qhat[client] = info["q"]
            self.versions[client] = info["base"] + 1
            record["uploads"] += 1
            record["bits_sent"] += info["bits"]
            errors.append(info["error"])
        record["quant_error"] = float(np.mean(errors)) if errors else None
        for key in ("uploads", "skips", "bits_sent"):
            self.totals[key] += record[key]
        grad = self.gradient_sum()
        alpha = np.float32(self.alpha)
        new = {key: self.global_state[key] - alpha * grad[key] for key in self.shapes}
        step = sum(squared_distance(new[key], self.global_state[key]) for key in self.shapes)
        self.history = [step, *self.history][: self.D]
        record["step_sq"] = step
        self._record = record
        return new

    def gradient_sum(self) -> State:
        """``grad = sum_m Qhat_m``, summed in partition order (zeros before any upload)."""
        grad = {key: np.zeros(shape, np.float32) for key, shape in self.shapes.items()}
        for client in sorted(self.qhat):
            for key in grad:
                grad[key] += self.qhat[client][key]
        return grad

    def round_record(self, server_round: int) -> dict[str, Any]:
        """Uploads, skips, bits sent (codes + radii), mean quantization error, totals."""
        record = self._record or self._empty_record()
        return {
            **record,
            "uploads_total": self.totals["uploads"],
            "skips_total": self.totals["skips"],
            "bits_sent_total": self.totals["bits_sent"],
        }

    def _empty_record(self) -> dict[str, Any]:
        return {"uploads": 0, "skips": 0, "resyncs": 0, "bits_sent": 0, "quant_error": None,
                "drift": self.drift(), "step_sq": None}

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "qhat": {str(client): dict(state) for client, state in self.qhat.items()},
            "versions": {str(client): version for client, version in self.versions.items()},
            "history": list(self.history),
            "totals": dict(self.totals),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.qhat = {int(client): {k: np.asarray(v, np.float32) for k, v in s.items()} for client, s in state["qhat"].items()}
        self.versions = {int(client): int(version) for client, version in state["versions"].items()}
        self.history = [float(x) for x in state["history"]]
        self.totals = {k: int(v) for k, v in state["totals"].items()}
        self.client_of_node = {}  # node ids of a resumed run are new; relearned from replies

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t└──> LAQ %s mode: bits=%d D=%d xi=%g tbar=%d alpha=%g M=%d",
            self.mode, self.bits, self.D, self.xi, self.tbar, self.alpha, self.num_clients)
