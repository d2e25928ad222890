"""LAQ: lazily aggregated, bit-quantized gradient innovations (see docs/algorithms.md)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.common.logger import log

from fedlayer.clientstore import ClientStates
from fedlayer.wire.laq_codec import EncodedTensor, LAQCodec, innovation_norm_sq
from fedlayer.wire.quantize import squared_distance
from fedlayer.errors import ParameterError, require
from fedlayer.layers import (
    State,
    from_arrayrecord,
    to_arrayrecord,
    torch_state_to_numpy,
)
from fedlayer.methods.base import LayerwiseStrategy, NodePlan
from fedlayer.methods.client import ClientRuntime, load_memory, server_round_of
from fedlayer.methods.replies import ReplyRejected, TrainReply
from fedlayer.wire.laq_proto import WireFormatError, decode_update, encode_update
from fedlayer.wire.records import ARRAYS, CONFIG, METRICS, PAYLOAD, TRAIN_SECONDS
from fedlayer.training import loss_gradient, train_steps

#: ``context.state`` records of a LAQ node: its last upload ``Qhat`` and its memory.
QHAT = "laq-qhat"
MEMORY = "laq"
#: Payload keys of a reply: the encoded ``CompressedUpdate`` and the version it is relative to.
UPDATE_KEY = "laq-update"
BASE_KEY = "laq-base"
#: Weight of the quantization errors ``e + ehat`` in the skip bound, per mode:
#: the paper's 3 for gradients; 0 for model deltas, whose quantization error
#: does not vanish, so the allowance would let stale deltas be re-applied forever.
ERROR_WEIGHT = {"gradient": 3.0, "delta": 0.0}
MODES = ("gradient", "delta")
#: State-dict suffixes of buffers: statistics, not gradients (refused).
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
#: Bits of the float32 radius sent with each tensor.
RADIUS_BITS = 32


class LAQStrategy(LayerwiseStrategy):
    """LAQ (Sun et al., NeurIPS 2019, https://arxiv.org/abs/1909.07588).

    Round ``k``, server model ``theta^k``, clients ``m = 1..M``:

    1. Send ``theta^k`` and ``drift = sum_{d=1..D} xi_d ||theta^{k+1-d} - theta^{k-d}||^2``.
    2. Client ``m`` computes ``g_m`` (``gradient`` mode: the gradient of its loss
       + ``l2/2 ||theta||^2``; ``delta`` mode: ``theta - theta_local`` after local SGD)
       and ``Q_m``, ``g_m - Qhat_m`` quantized with ``b`` bits around ``Qhat_m``.
    3. It uploads ``Q_m`` iff ``||Q_m - Qhat_m||^2 >= drift / (alpha^2 M^2) + w (e_m + ehat_m)``
       (``w`` = 3 in gradient mode, 0 in delta mode) or its clock reached ``tbar``;
       else it skips.
    4. The server sets ``Qhat_m <- Q_m`` for uploaders and steps
       ``theta^{k+1} = theta^k - alpha sum_m Qhat_m``.

    Partial participation: a client not sampled cannot upload, so the server
    keeps its own clock of rounds since each client's last upload; a stored
    ``Qhat_m`` older than ``tbar`` rounds is dropped from the sum, and the
    client resynchronises when it is next sampled. (With every client
    sampled, the client's own clock forces an upload first, so nothing is dropped.)

    Parameters
    ----------
    initial_state : State
        The initial global model; every tensor must be a float parameter (no BatchNorm buffers).
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
    **base
        ``LayerwiseStrategy`` arguments (sampling, seed).
    """

    method = "laq"
    averages_layers = False

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
        **base: Any,
    ) -> None:
        require(mode in MODES, "mode", f"must be one of {list(MODES)}", mode)
        for name, value, low in (("bits", bits, 1), ("D", D, 1), ("tbar", tbar, 1), ("batch_size", batch_size, 0)):
            require(isinstance(value, int) and not isinstance(value, bool) and value >= low, name, f"must be an integer >= {low}", value)
        require(bits <= 8, "bits", "must be in 1..8", bits)
        for name, value, positive in (("alpha", alpha, True), ("xi", xi, False), ("l2", l2, False)):
            ok = isinstance(value, (int, float)) and math.isfinite(value) and value >= 0 and not (positive and value == 0)
            require(ok, name, f"must be a finite number {'> 0' if positive else '>= 0'}", value)
        not_gradients = [
            key for key, value in initial_state.items()
            if not np.issubdtype(value.dtype, np.floating) or key.endswith(BUFFER_SUFFIXES)
        ]
        if not_gradients:
            raise ParameterError(
                "initial_state",
                f"LAQ quantizes gradients of parameters; this model has buffers {not_gradients[:4]} "
                "(BatchNorm): use a model without them (linear, cnn)",
            )
        super().__init__(initial_state, **base)
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
        self.laq_codec = LAQCodec()
        #: client -> its last upload Qhat (on disk beyond the strategy's memory budget)
        self.qhat = ClientStates("laq-qhat", self.state_budget_bytes)
        self.versions: dict[int, int] = {}
        self.history: list[float] = []  # ||theta^{k+1-d} - theta^{k-d}||^2, most recent first
        #: client -> the round of its last upload (the server's staleness clock)
        self.last_upload: dict[int, int] = {}
        self.totals = {"uploads": 0, "skips": 0, "bits_sent": 0, "stale_dropped": 0}
        self.client_limit = num_clients
        self._record: dict[str, Any] = {}

    # ------------------------------------------------------------------ hooks
    def attach_run_dir(self, run_dir: Path) -> None:
        super().attach_run_dir(run_dir)
        self.qhat.attach(Path(run_dir) / "server-state")

    def drift(self) -> float:
        """``sum_{d=1..D} xi_d ||theta^{k+1-d} - theta^{k-d}||^2`` over the steps taken so far."""
        return self.xi / self.D * float(sum(self.history[: self.D]))

    def start_round(self, server_round: int) -> None:
        self._record = self._empty_record()

    def plan(self, server_round: int, node_id: int) -> NodePlan:
        """The full model down, nothing dense back; the rule's inputs in the config."""
        client = self.client_of.get(node_id)
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
        if node not in self.client_of:
            raise ReplyRejected(node, "reply from a node whose client id is not registered")
        client = self.client_of[node]
        data, base = reply.payload.get(UPDATE_KEY), reply.payload.get(BASE_KEY)
        if not isinstance(data, bytes):
            raise ReplyRejected(node, f"payload {UPDATE_KEY!r} must be bytes, got {type(data).__name__}")
        if not isinstance(base, int) or isinstance(base, bool) or base < 0:
            raise ReplyRejected(node, f"payload {BASE_KEY!r} must be an integer >= 0, got {base!r}")
        try:
            update = decode_update(data, expected=self.shapes)
        except WireFormatError as err:
            raise ReplyRejected(node, f"malformed LAQ update: {err}") from None
        other = next((t for t in update.tensors if t.bits != self.bits), None)
        if other is not None:  # the wire allows 1..8 bits; this run's contract is ``bits``
            raise ReplyRejected(node, f"LAQ update encoded at {other.bits} bits ({other.name}), configured bits={self.bits}")
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
                value = self.laq_codec.decode(by_name[key], ref)
                if not np.isfinite(value).all():
                    raise ReplyRejected(node, f"{key}: decoded update is not finite")
                q[key] = value
                bits += value.size * by_name[key].bits + RADIUS_BITS
        reply.payload = {"client": client, "q": q, "base": base, "bits": bits, "error": update.quantization_error}
        return reply

    def update_norms(self, reply: TrainReply) -> dict[str, float] | None:
        """The guard's norms: of the decoded ``Q_m``, the term of ``sum_m Qhat_m`` the upload
        becomes (None for a skip). An innovation ``Q_m - Qhat_m`` is small next to a
        resync's ``Q_m`` (its base is zero), so comparing the two would refuse a returning
        client every round; every upload's ``Q_m`` is a gradient estimate of the same size."""
        q = reply.payload["q"]
        if q is None:
            return None
        return {key: float(np.linalg.norm(q[key].astype(np.float64))) for key in q}

    def aggregate(self, server_round: int, replies: list[TrainReply]) -> State:
        """Replace the uploaders' ``Qhat_m``, re-sum, step ``theta -= alpha * grad``."""
        record = self._empty_record()
        errors: list[float] = []
        for reply in replies:
            info = reply.payload
            client = info["client"]
            if info["q"] is None:
                record["skips"] += 1
                continue
            if info["base"] == 0 and self.versions.get(client, 0) > 0:
                record["resyncs"] += 1
            self.qhat.put(client, info["q"], server_round)
            self.versions[client] = info["base"] + 1
            self.last_upload[client] = server_round
            record["uploads"] += 1
            record["bits_sent"] += info["bits"]
            errors.append(info["error"])
        record["quant_error"] = float(np.mean(errors)) if errors else None
        record["stale_dropped"] = self.drop_stale(server_round)
        for key in ("uploads", "skips", "bits_sent", "stale_dropped"):
            self.totals[key] += record[key]
        grad = self.gradient_sum()
        alpha = np.float32(self.alpha)
        new = {key: self.global_state[key] - alpha * grad[key] for key in self.shapes}
        step = sum(squared_distance(new[key], self.global_state[key]) for key in self.shapes)
        self.history = [step, *self.history][: self.D]
        record["step_sq"] = step
        self._record = record
        return new

    def drop_stale(self, server_round: int) -> int:
        """Drop stored updates not refreshed for more than ``tbar`` rounds; how many were dropped.

        The client then holds a version the server no longer has, so it
        resynchronises (a dense-from-zero upload) when next sampled.
        """
        stale = [c for c in self.qhat if server_round - self.last_upload.get(c, 0) > self.tbar]
        for client in stale:
            self.qhat.pop(client)
            self.versions[client] = 0
        return len(stale)

    def gradient_sum(self) -> State:
        """``grad = sum_m Qhat_m``, summed in partition order (zeros before any upload)."""
        grad = {key: np.zeros(shape, np.float32) for key, shape in self.shapes.items()}
        for client in self.qhat.clients():
            qhat = self.qhat[client]
            for key in grad:
                grad[key] += qhat[key]
        return grad

    def round_record(self, server_round: int) -> dict[str, Any]:
        """Uploads, skips, bits sent (codes + radii), mean quantization error, totals."""
        record = self._record or self._empty_record()
        return {
            **record,
            "uploads_total": self.totals["uploads"],
            "skips_total": self.totals["skips"],
            "bits_sent_total": self.totals["bits_sent"],
            "stale_dropped_total": self.totals["stale_dropped"],
        }

    def _empty_record(self) -> dict[str, Any]:
        return {"uploads": 0, "skips": 0, "resyncs": 0, "bits_sent": 0, "quant_error": None,
                "stale_dropped": 0, "drift": self.drift(), "step_sq": None}

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "qhat": self.qhat.state_dict(),
            "versions": {str(client): version for client, version in self.versions.items()},
            "history": list(self.history),
            "last_upload": {str(client): r for client, r in self.last_upload.items()},
            "totals": dict(self.totals),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.qhat.load_state_dict(state["qhat"])
        self.versions = {int(client): int(version) for client, version in state["versions"].items()}
        self.history = [float(x) for x in state["history"]]
        self.last_upload = {int(client): int(r) for client, r in state["last_upload"].items()}
        self.totals = {k: int(v) for k, v in state["totals"].items()}

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t└──> LAQ %s mode: bits=%d D=%d xi=%g tbar=%d alpha=%g M=%d",
            self.mode, self.bits, self.D, self.xi, self.tbar, self.alpha, self.num_clients)


# --- client half ----------------------------------------------------------------
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


def laq_train(runtime: ClientRuntime, content: RecordDict, context: Context) -> RecordDict:
    """One LAQ round: gradient (or model delta) at the received model, lazy upload."""
    config = content[CONFIG]
    server_round = server_round_of(content)
    mode = str(config["laq-mode"])
    theta = from_arrayrecord(content[ARRAYS])
    model = runtime.model_with(theta)
    seed = runtime.round_seed(server_round)
    start = time.perf_counter()
    if mode == "gradient":
        g, loss = loss_gradient(
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
    seconds = time.perf_counter() - start

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
    context.state[MEMORY] = ConfigRecord({"version": version, "ehat": ehat, "clock": clock})

    metrics = {
        **runtime.reply_metrics(model),  # gradient mode: the model is still theta
        "train-loss": loss,
        TRAIN_SECONDS: seconds,
        "laq-upload": float(decision.upload),
        "laq-innovation": decision.innovation,
        "laq-threshold": decision.threshold,
    }
    return RecordDict(
        {METRICS: MetricRecord(metrics), PAYLOAD: ConfigRecord({UPDATE_KEY: data, BASE_KEY: base})}
    )
