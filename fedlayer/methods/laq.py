"""LAQ: lazily aggregated, bit-quantized gradient innovations (see docs/algorithms.md)."""

from __future__ import annotations

import math
import time
from dataclasses import astuple, dataclass
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.common.logger import log
from torch import nn

from fedlayer.server_client_state import ClientStates
from fedlayer.errors import ParameterError, require
from fedlayer.layers import (
    State,
    from_arrayrecord,
    squared_distance,
    to_arrayrecord,
    torch_state_to_numpy,
)
from fedlayer.methods.base import LayerwiseStrategy, NodePlan, StrategyState
from fedlayer.methods.client_half import ClientRuntime, load_memory, server_round_of
from fedlayer.methods.replies import ReplyRejected, TrainReply
from fedlayer.wire.messages import MessageError, decode, encode, wire
from fedlayer.wire.records import ARRAYS, CODED, CONFIG, METRICS, PAYLOAD, TRAIN_SECONDS
from fedlayer.wire.tensors import CodecError, decode_tensor, encode_grid, grid_bits
from fedlayer.data import ArrayDataset
from fedlayer.training import train_steps

#: ``context.state`` records of a LAQ node: its last upload ``Qhat`` and its memory.
QHAT = "laq-qhat"
MEMORY = "laq"
#: Payload keys of a reply: the version its update is quantised against, whether it skips, and
#: its quantization error ``e``; the update's tensors travel in ``CODED`` (``update_records``).
BASE_KEY = "laq-base"
SKIP_KEY = "laq-skip"
ERROR_KEY = "laq-error"
#: Weight of the quantization errors ``e + ehat`` in the skip bound, per mode:
#: the paper's 3 for gradients; 0 for model deltas, whose quantization error
#: does not vanish, so the allowance would let stale deltas be re-applied forever.
ERROR_WEIGHT = {"gradient": 3.0, "delta": 0.0}
MODES = ("gradient", "delta")
#: State-dict suffixes of buffers: statistics, not gradients (refused).
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
#: Bits of the float32 radius sent with each tensor.
RADIUS_BITS = 32


@dataclass(frozen=True)
class LAQOptions:
    """LAQ's arguments (see ``LAQStrategy``), checked: ``ParameterError`` names the one that cannot work."""

    mode: str
    bits: int
    D: int
    xi: float
    tbar: int
    alpha: float
    l2: float
    batch_size: int

    def __post_init__(self) -> None:
        require(self.mode in MODES, "mode", f"must be one of {list(MODES)}", self.mode)
        for name, low in (("bits", 1), ("D", 1), ("tbar", 1), ("batch_size", 0)):
            value = getattr(self, name)
            require(isinstance(value, int) and not isinstance(value, bool) and value >= low, name, f"must be an integer >= {low}", value)
        require(self.bits <= 8, "bits", "must be in 1..8", self.bits)
        for name, positive in (("alpha", True), ("xi", False), ("l2", False)):
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and math.isfinite(value) and value >= 0 and not (positive and value == 0)
            require(ok, name, f"must be a finite number {'> 0' if positive else '>= 0'}", value)


@dataclass(frozen=True)
class LAQConfig:
    """Down: the lazy rule's inputs, and the version of the node's ``Qhat`` the server holds
    (-1: the server does not know the node yet)."""

    mode: str = wire("laq-mode")
    bits: int = wire("laq-bits")
    tbar: int = wire("laq-tbar")
    l2: float = wire("laq-l2")
    batch_size: int = wire("laq-batch-size")
    drift: float = wire("laq-drift")
    drift_scale: float = wire("laq-drift-scale")
    version: int = wire("laq-version")

    def check(self) -> None:
        if self.mode not in MODES:
            raise MessageError(f"'laq-mode' must be one of {list(MODES)}, got {self.mode!r}")


@dataclass(frozen=True)
class LAQUpdate:
    """Up, in a reply's ``PAYLOAD`` record: the version ``base`` (>= 0) the update is quantised against,
    whether it skips, and its quantization error ``e`` (finite, >= 0); its tensors travel in ``CODED``."""

    base: int = wire(BASE_KEY)
    skip: bool = wire(SKIP_KEY)
    error: float = wire(ERROR_KEY)

    def check(self) -> None:
        if self.base < 0:
            raise MessageError(f"{BASE_KEY!r} must be an integer >= 0, got {self.base!r}")
        if not (math.isfinite(self.error) and self.error >= 0):
            raise MessageError(f"{ERROR_KEY!r} must be a finite number >= 0, got {self.error!r}")


@dataclass
class LAQState(StrategyState):
    """What LAQ keeps between rounds (checkpointed; see ``methods.server_state``)."""

    #: client -> its last upload Qhat (on disk beyond the strategy's memory budget)
    qhat: ClientStates
    qhat_sum: dict[str, np.ndarray]
    versions: dict[int, int]
    history: list[float]
    last_upload: dict[int, int]
    totals: dict[str, int]


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
    server_state = LAQState

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
        self.options = LAQOptions(mode=mode, bits=bits, D=D, xi=xi, tbar=tbar, alpha=alpha, l2=l2, batch_size=batch_size)
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
        self.shapes = {key: tuple(value.shape) for key, value in self.global_state.items()}
        self.qhat = ClientStates("laq-qhat", self.state_budget_bytes)
        #: ``sum_m Qhat_m`` over the stored updates as a running total, in float64 so that replacing
        #: and dropping updates adds no rounding drift (one model-sized state; checkpointed)
        self.qhat_sum: State = {key: np.zeros(shape, np.float64) for key, shape in self.shapes.items()}
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
        return self.options.xi / self.options.D * float(sum(self.history[: self.options.D]))

    def start_round(self, server_round: int) -> None:
        self._record = self._empty_record()

    def plan(self, server_round: int, node_id: int) -> NodePlan:
        """The full model down, nothing dense back; the rule's inputs in the config."""
        client = self.client_of.get(node_id)
        o = self.options
        message = LAQConfig(
            mode=o.mode, bits=o.bits, tbar=o.tbar, l2=o.l2, batch_size=o.batch_size, drift=self.drift(),
            drift_scale=1.0 / (o.alpha**2 * self.num_clients**2),
            version=-1 if client is None else self.versions.get(client, 0),
        )
        return NodePlan(send=self.layers.names, request=[], config=encode(message))

    def validate(self, server_round: int, message: Message) -> TrainReply:
        """Dense checks (none requested), then the update's scalars, then its coded tensors.

        On success ``reply.payload`` holds ``client``, ``q`` (the decoded
        ``Q`` per key, or None for a skip), ``base``, ``bits`` and ``error``.
        """
        reply = super().validate(server_round, message)
        node = reply.node_id
        if node not in self.client_of:
            raise ReplyRejected(node, "reply from a node whose client id is not registered")
        client = self.client_of[node]
        try:
            base, skip, error = astuple(decode(LAQUpdate, reply.payload))
        except MessageError as err:
            raise ReplyRejected(node, f"malformed LAQ update: payload {err}") from None
        q: State | None = None
        bits = 0
        if skip:
            if CODED in message.content:
                raise ReplyRejected(node, f"malformed LAQ update: a skip carries a record {CODED!r}")
        else:
            coded = self._coded(node, message)
            current = self.versions.get(client, 0)
            if base not in (0, current):
                raise ReplyRejected(node, f"update quantized against version {base}; the server holds {current}")
            reference = self.qhat.get(client) if base else None
            q = {}
            for key, shape in self.shapes.items():
                ref = reference[key] if reference is not None else np.zeros(shape, np.float32)
                try:
                    value = decode_tensor(coded[key], ref)
                except CodecError as err:
                    raise ReplyRejected(node, f"malformed LAQ update: {key}: {err}") from None
                if not np.isfinite(value).all():
                    raise ReplyRejected(node, f"{key}: decoded update is not finite")
                q[key] = value
                bits += value.size * self.options.bits + RADIUS_BITS
        reply.payload = {"client": client, "q": q, "base": base, "bits": bits, "error": float(error)}
        return reply

    def _coded(self, node: int, message: Message) -> dict[str, Array]:
        """An upload's coded tensors: every model tensor, of its shape, on the LAQ grid at ``bits``."""
        coded = message.content.array_records.get(CODED)
        if coded is None:
            raise ReplyRejected(node, f"malformed LAQ update: an upload without the ArrayRecord {CODED!r}")
        missing = sorted(set(self.shapes) - set(coded))
        unexpected = sorted(set(coded) - set(self.shapes))
        if missing or unexpected:
            raise ReplyRejected(node, f"malformed LAQ update: tensors missing {missing[:5]}, unexpected {unexpected[:5]}")
        for key, shape in self.shapes.items():
            array = coded[key]
            bits = grid_bits(array)
            if bits is None or tuple(array.shape) != shape:
                raise ReplyRejected(
                    node, f"malformed LAQ update: {key} is {array.stype or 'dense'} {array.dtype}{tuple(array.shape)}, "
                    f"expected {shape} on the LAQ grid"
                )
            if bits != self.options.bits:  # the format allows 1..8 bits; this run's contract is ``bits``
                raise ReplyRejected(node, f"LAQ update encoded at {bits} bits ({key}), configured bits={self.options.bits}")
        return dict(coded.items())

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
        """Replace the uploaders' ``Qhat_m`` (in the stored updates and their running sum), step ``theta -= alpha * grad``."""
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
            self.replace_in_sum(self.qhat.get(client), info["q"])
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
        alpha = np.float32(self.options.alpha)
        new = {key: self.global_state[key] - alpha * grad[key] for key in self.shapes}
        step = sum(squared_distance(new[key], self.global_state[key]) for key in self.shapes)
        self.history = [step, *self.history][: self.options.D]
        record["step_sq"] = step
        self._record = record
        return new

    def drop_stale(self, server_round: int) -> int:
        """Drop stored updates not refreshed for more than ``tbar`` rounds; how many were dropped.

        The client then holds a version the server no longer has, so it
        resynchronises (a dense-from-zero upload) when next sampled.
        """
        stale = [c for c in self.qhat if server_round - self.last_upload.get(c, 0) > self.options.tbar]
        for client in stale:
            self.replace_in_sum(self.qhat.get(client), None)
            self.qhat.pop(client)
            self.versions[client] = 0
        return len(stale)

    def replace_in_sum(self, old: State | None, new: State | None) -> None:
        """A client's stored update ``old`` becomes ``new`` in ``qhat_sum`` (None: none); new arrays,
        so a snapshot taken before the round keeps its own."""
        for key, total in self.qhat_sum.items():
            if old is not None:
                total = total - old[key]
            if new is not None:
                total = total + new[key]
            self.qhat_sum[key] = total

    def gradient_sum(self) -> State:
        """``grad = sum_m Qhat_m`` (zeros before any upload), from the running total."""
        return {key: total.astype(np.float32) for key, total in self.qhat_sum.items()}

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

    def summary(self) -> None:
        """Log the method's own settings, then the base strategy's (as Flower's strategies do)."""
        log(INFO, "\t└──> LAQ %s mode: bits=%d D=%d xi=%g tbar=%d alpha=%g M=%d",
            self.options.mode, self.options.bits, self.options.D, self.options.xi, self.options.tbar, self.options.alpha, self.num_clients)
        super().summary()


# --- client half ----------------------------------------------------------------
@dataclass(frozen=True)
class LazyDecision:
    """Outcome of the lazy rule for one round's gradient ``g``.

    ``q`` is the new quantized gradient ``Q`` (what the server rebuilds), ``error``
    ``e = ||Q - g||^2``, ``innovation`` ``||Q - Qhat||^2`` and ``threshold`` its
    bound; ``tensors`` are ``Q``'s coded Arrays (``update_records``; sent only when ``upload``).
    """

    upload: bool
    q: State
    tensors: ArrayRecord
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
    ``force``. Keys are taken in ``g``'s order; each is coded on the LAQ grid
    of the shared tensor format (``wire/tensors.py``).
    """
    tensors: dict[str, Array] = {}
    q: State = {}
    error = innovation = 0.0
    for key, value in g.items():
        tensors[key], q[key] = encode_grid(value, qhat[key], bits)
        error += squared_distance(q[key], value)
        innovation += squared_distance(q[key], qhat[key])
    threshold = drift_scale * drift + error_weight * (error + ehat)
    upload = force or clock >= tbar or innovation >= threshold
    return LazyDecision(upload, q, ArrayRecord(tensors), error, innovation, threshold)


def update_records(base: int, tensors: ArrayRecord | None, error: float = 0.0) -> dict[str, ConfigRecord | ArrayRecord]:
    """A reply's update: in ``PAYLOAD`` the version ``base`` it is quantised against, whether it
    skips (``tensors`` None) and its quantization error; its coded tensors in ``CODED`` (one
    Array per tensor key, so the ledger counts each layer's bytes)."""
    payload = ConfigRecord(encode(LAQUpdate(base, skip=tensors is None, error=float(error))))
    return {PAYLOAD: payload} if tensors is None else {PAYLOAD: payload, CODED: tensors}


def loss_gradient(
    model: nn.Module, data: ArrayDataset, l2: float, batch_size: int, seed: int, device: torch.device
) -> tuple[State, float]:
    """Gradient of ``mean CE loss + l2/2 ||theta||^2`` at the model's parameters.

    ``batch_size`` 0 (or >= the split) uses the whole split; otherwise one
    seeded minibatch of that size. Returns (gradient per parameter, loss).
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
    config = decode(LAQConfig, content[CONFIG])
    server_round = server_round_of(content)
    mode = config.mode
    theta = from_arrayrecord(content[ARRAYS])
    model = runtime.model_with(theta)
    seed = runtime.round_seed(server_round)
    start = time.perf_counter()
    if mode == "gradient":
        g, loss = loss_gradient(
            model, runtime.train_data, config.l2, config.batch_size, seed, runtime.device
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
    server_version = config.version
    resync = qhat is None or (server_version >= 0 and server_version != version)
    if resync:
        qhat = {key: np.zeros_like(value) for key, value in g.items()}
        version, ehat = 0, 0.0

    decision = lazy_decision(
        g, qhat, bits=config.bits, ehat=ehat, clock=clock, tbar=config.tbar,
        drift=config.drift, drift_scale=config.drift_scale,
        error_weight=ERROR_WEIGHT[mode], force=resync,
    )
    if decision.upload:
        update = update_records(version, decision.tensors, decision.error)
        context.state[QHAT] = to_arrayrecord(decision.q)
        ehat, clock, version = decision.error, 0, version + 1
    else:
        update = update_records(version, None)
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
    return RecordDict({METRICS: MetricRecord(metrics), **update})
