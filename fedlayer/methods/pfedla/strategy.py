"""pFedLA: layer-wise personalised aggregation by per-client hypernetworks (see docs/algorithms.md)."""

from __future__ import annotations

import io
import math
from logging import INFO
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import MessageType
from flwr.common.logger import log

from fedlayer.errors import require
from fedlayer.method_report import LayerWeights, MethodReport
from fedlayer.files import FileVersions, atomic_write
from fedlayer.layers import State, select
from fedlayer.methods.base import LayerwiseStrategy, StrategyState
from fedlayer.methods.pfedla.hypernetwork import ClientHypernetwork, aggregation_weights
from fedlayer.methods.pfedla.store import ClientModelStore
from fedlayer.methods.replies import TrainReply
from fedlayer.methods.server_state import attr


#: Values of ``hn_step``: whose hypernetworks a round steps.
HN_STEP = ("sampled", "all")
#: ``hn_step="all"``: memory for one layer's ``-Delta`` slices of a group of unsampled clients.
STORED_DELTA_GROUP_BYTES = 128 * 2**20


@dataclass
class PFedLAState(StrategyState):
    """Which version of each client's files is current (checkpointed; see ``methods.server_state``).

    The client models and hypernetworks are not copied into the checkpoint
    (that would hold all N in memory): they stay in versioned files in the
    run directory, and the checkpoint names the versions of its round. It
    names no folder: a run directory that moved resumes where it is now.
    Loading needs the run directory attached first (``attach_run_dir``, as the
    round loop does); files a crashed later round wrote are discarded.
    """

    model_versions: FileVersions = attr("store.versions")
    hypernetwork_versions: FileVersions = attr("hn_files")
    #: ``hn_step="all"``: each client's stored last ``-Delta`` (empty otherwise)
    delta_versions: FileVersions = attr("deltas.versions")


class PFedLAStrategy(LayerwiseStrategy):
    """pFedLA (Ma et al., CVPR 2022, https://arxiv.org/abs/2203.11516).

    The server keeps every client's latest model ``theta_j`` and, per client
    ``i``, a hypernetwork ``HN_i`` with embedding ``v_i``. Each round, for every
    sampled client ``i``:

    1. ``alpha_i = HN_i(v_i)`` (one row of N weights per layer ``l``);
       ``w_ij^l = alpha_ij^l / sum_j alpha_ij^l`` over clients that have trained.
    2. Send ``thetabar_i^l = sum_j w_ij^l theta_j^l``; the client trains it and
       returns ``theta_new``.
    3. ``Delta_i = theta_new - thetabar_i``; step ``(HN_i, v_i)`` by SGD along
       ``autograd.grad(thetabar_i, params, grad_outputs=-Delta_i)``.
    4. Store ``theta_i <- theta_new``.

    HeurpFedLA (``k > 0``): the ``k`` layers with the largest self-weight
    ``w_ii^l`` stay local (one-hot) and get no hypernetwork gradient.

    With ``hn_step="all"`` every client that has trained at least once and is
    not among the round's replies also gets a step 3, from its stored last
    ``Delta_i`` (against the current hypernetwork and stored models).

    Parameters
    ----------
    initial_state : State
        The initial model; every client's stored model until it trains.
    num_clients : int
        ``N`` client slots: ``partition-id`` 0..N-1; a device without one takes a
        free slot (``fedlayer.methods.identity``), and everything is kept per slot.
    embedding_dim, hidden_dim : int
        Size of ``v_i`` and of the hypernetwork's hidden layers (paper: 100, 100).
    hn_lr : float
        SGD step size of the hypernetwork and embedding update.
    k : int
        HeurpFedLA: layers kept local per client (0: plain pFedLA).
    alpha_every : int
        Write the round's aggregation weights to ``pfedla/alpha/round-NNNNNN.npz``
        every this many rounds (0: never; the final weights are always written).
    hn_step : str
        Whose hypernetworks are stepped each round: ``"sampled"`` (the paper's
        rule): the clients that replied; ``"all"``: those, plus every other
        client that has trained before, from its stored last ``Delta``
        (kept on disk under ``pfedla/delta``).
    **base
        ``LayerwiseStrategy`` arguments.
    """

    method = "pfedla"
    per_node_state = True
    server_state = PFedLAState
    averages_layers = False
    no_global_model = "its clients train personalised models; the global model is only evaluated centrally"

    def __init__(
        self,
        initial_state: State,
        *,
        num_clients: int,
        embedding_dim: int = 100,
        hidden_dim: int = 100,
        hn_lr: float = 5e-3,
        k: int = 0,
        alpha_every: int = 10,
        hn_step: str = "sampled",
        **base: Any,
    ) -> None:
        for name, value in (("num_clients", num_clients), ("embedding_dim", embedding_dim), ("hidden_dim", hidden_dim)):
            require(isinstance(value, int) and value >= 1, name, "must be a positive integer", value)
        require(isinstance(alpha_every, int) and alpha_every >= 0, "alpha_every", "must be an integer >= 0", alpha_every)
        require(isinstance(hn_lr, (int, float)) and math.isfinite(hn_lr) and hn_lr > 0, "hn_lr", "must be a positive number", hn_lr)
        require(hn_step in HN_STEP, "hn_step", f"must be one of {list(HN_STEP)}", hn_step)
        super().__init__(initial_state, **base)
        require(isinstance(k, int) and 0 <= k <= len(self.layers), "k", f"must be in [0, {len(self.layers)}] (the model's layers)", k)
        self.num_clients = num_clients
        self.embedding_dim = embedding_dim
        self.hidden_dim = hidden_dim
        self.hn_lr = hn_lr
        self.k = k
        self.alpha_every = alpha_every
        self.hn_step = hn_step
        self.client_limit = num_clients
        self.start_round(0)

    def attach_run_dir(self, run_dir: Path) -> None:
        """Keep client models and hypernetworks under ``run_dir/pfedla``."""
        super().attach_run_dir(run_dir)
        self.workdir = Path(run_dir) / "pfedla"
        self.store = ClientModelStore(self.workdir / "models", self.layers, self.global_state)
        self.sent = ClientModelStore(self.workdir / "sent", self.layers, self.global_state)
        # hn_step="all": each client's last -Delta (float entries; 0 elsewhere), versioned by round
        self.deltas = ClientModelStore(self.workdir / "delta", self.layers, self.global_state)
        self.hn_files = FileVersions(self.workdir, "hn", ".npz")

    def start_round(self, server_round: int) -> None:
        """Per-round records start empty: a round reports only its own clients."""
        self.round_weights: dict[int, np.ndarray] = {}
        self.round_local: dict[int, list[str]] = {}
        self.round_accuracy: dict[int, float] = {}
        self.round_delta_norm: dict[int, float] = {}
        self.round_stored_steps = 0

    # -------------------------------------------------------- hypernetworks
    def hypernetwork(self, client: int) -> ClientHypernetwork:
        """Client ``client``'s hypernetwork, from disk or freshly initialised."""
        hn = ClientHypernetwork(
            self.num_clients, len(self.layers), self.embedding_dim, self.hidden_dim, seed=self.seed * 1_000_003 + client
        )
        path = self.hn_files.current_path(client)
        if path is not None:
            with np.load(path) as saved:
                hn.load_numpy({name: saved[name] for name in saved.files})
        return hn

    def save_hypernetwork(self, client: int, hn: ClientHypernetwork, version: int) -> None:
        """Write the client's hypernetwork as ``version`` (the round that updated it)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez(buffer, **hn.to_numpy())
        atomic_write(self.hn_files.path(client, version), buffer.getvalue())
        self.hn_files.commit(client, version)

    def weights(self, client: int, hn: ClientHypernetwork | None = None) -> tuple[torch.Tensor, list[int]]:
        """Client ``client``'s aggregation weights ``(L, N)`` (differentiable) and its local layers.

        With ``k > 0`` the ``k`` layers with the largest self-weight become one-hot
        on the client (kept local); their rows carry no gradient.
        """
        hn = hn if hn is not None else self.hypernetwork(client)
        weights = aggregation_weights(hn() * self.trained_mask(), client)
        local: list[int] = []
        if self.k:
            self_weight = weights[:, client].detach().numpy()
            local = sorted(np.argsort(-self_weight, kind="stable")[: self.k].tolist())
            one_hot = torch.zeros(self.num_clients)
            one_hot[client] = 1.0
            rows = [one_hot if index in local else weights[index] for index in range(len(self.layers))]
            weights = torch.stack(rows)
        return weights, local

    def trained_mask(self) -> torch.Tensor:
        """1 for clients with a trained model stored, 0 for those still at the initial model.

        With partial participation most clients have not trained in the first
        rounds; mixing their (initial) models into every personalised model
        drags all of them back towards the initialisation. So they get no
        weight until they have trained once (if nobody has, the one-hot
        fallback gives the client its own, initial, model).
        """
        mask = torch.zeros(self.num_clients)
        mask[self.store.clients()] = 1.0
        return mask

    def personalised(self, client: int, weights: np.ndarray) -> State:
        """``thetabar_client``, mixed layer by layer from the stored models."""
        everyone = list(range(self.num_clients))
        state: State = {}
        for index, name in enumerate(self.layers.names):
            state.update(self.store.unflatten_layer(name, self.store.mix_layer(everyone, weights[index], name)))
        return state

    # ------------------------------------------------------------------ hooks
    def node_state(self, node_id: int, names: list[str], message_type: str) -> State:
        """The node's personalised model; a training node's copy is kept to form its Delta."""
        client = self.slot(node_id)
        with torch.no_grad():
            weights, local = self.weights(client)
        matrix = weights.numpy().astype(np.float64)
        state = self.personalised(client, matrix)
        if message_type == MessageType.TRAIN:
            self.sent.write(client, self.sent.flatten(state))
            self.round_weights[client] = matrix
            self.round_local[client] = [self.layers.names[i] for i in local]
        return select(state, self.layers, names)

    def aggregate(self, server_round: int, replies: list[TrainReply]) -> State:
        """Step every replying client's hypernetwork, then store the trained models.

        All steps use the models stored before this round (the ones the
        personalised models were built from); the new models are written after.
        With ``hn_step="all"`` the other clients that have trained before are
        stepped too, from their stored last ``Delta``. The global model (used
        only for the central evaluation) is the example-weighted mean of the
        trained models.
        """
        replied = set()
        for reply in replies:
            client = self.slot(reply.node_id)
            replied.add(client)
            self.hypernetwork_step(client, self.store.flatten(reply.state), server_round)
            if "local-test-accuracy" in reply.metrics:
                self.round_accuracy[client] = reply.metrics["local-test-accuracy"]
        if self.hn_step == "all":
            self.stored_delta_steps([c for c in self.deltas.clients() if c not in replied], server_round)
        for reply in replies:
            self.store.write(self.slot(reply.node_id), self.store.flatten(reply.state), server_round)
        self.write_round_alpha(server_round)
        return super().aggregate(server_round, replies)

    def hypernetwork_step(self, client: int, trained: np.ndarray, version: int) -> None:
        """One SGD step of ``(HN_i, v_i)`` from ``Delta_i = trained - thetabar_i``; saved to disk as ``version``.

        With ``hn_step="all"``, ``-Delta_i`` is kept (as ``version``) for the rounds the client is not sampled.
        """
        minus_delta = np.concatenate([self.minus_delta_layer(client, trained, name) for name in self.layers.names])
        if self.hn_step == "all":
            self.deltas.write(client, minus_delta, version)
        self.round_delta_norm[client] = math.sqrt(sum(float(part @ part) for part in self.layer_slices(minus_delta)))
        self.apply_step(client, lambda name: self.layer_slice(minus_delta, name), version)

    def stored_delta_steps(self, clients: list[int], version: int) -> None:
        """``hn_step="all"``: one SGD step of each unsampled client's ``(HN_i, v_i)`` from its stored last ``Delta_i``.

        The dot products with the stored models are formed for a group of
        clients per pass over the store (each stored layer slice is read once
        per group, not once per client); a group's ``-Delta`` slices of one
        layer, in float64, stay within ``STORED_DELTA_GROUP_BYTES``.
        """
        largest = max(size for _, size in self.store.offsets.values())
        group_size = max(1, STORED_DELTA_GROUP_BYTES // (8 * largest))
        stored = self.store.clients()
        for begin in range(0, len(clients), group_size):
            group = clients[begin : begin + group_size]
            dots = np.zeros((len(group), len(self.layers), self.num_clients))
            for index, name in enumerate(self.layers.names):
                minus_deltas = np.stack([self.deltas.read_layer(client, name) for client in group]).astype(np.float64)
                for j, theta in self.store.iter_layer(stored, name):  # the others weigh 0
                    dots[:, index, j] = minus_deltas @ theta.astype(np.float64)
            for row, client in enumerate(group):
                hn = self.hypernetwork(client)
                self.apply_gradients(client, hn, self.gradients_from_dots(client, hn, dots[row]), version)
                self.round_stored_steps += 1

    def apply_step(self, client: int, minus_delta_layer: Callable[[str], np.ndarray], version: int) -> None:
        """Step client ``client``'s hypernetwork along ``-Delta`` (given per layer); save it as ``version``."""
        hn = self.hypernetwork(client)
        self.apply_gradients(client, hn, self.gradients_along(client, hn, minus_delta_layer), version)

    def apply_gradients(self, client: int, hn: ClientHypernetwork, grads: list[torch.Tensor | None], version: int) -> None:
        """One SGD step of ``hn`` with lr ``hn_lr``; saved as the client's hypernetwork ``version``."""
        with torch.no_grad():
            for param, grad in zip(hn.parameters(), grads):
                if grad is not None:
                    param -= self.hn_lr * grad
        self.save_hypernetwork(client, hn, version)

    def minus_delta_layer(self, client: int, trained: np.ndarray, name: str) -> np.ndarray:
        """``thetabar_i - theta_new`` of one layer, float entries only (integer counters are not learnt)."""
        start, size = self.store.offsets[name]
        return np.where(self.store.float_mask(name), self.sent.read_layer(client, name) - trained[start : start + size], 0.0)

    def layer_slice(self, flat: np.ndarray, name: str) -> np.ndarray:
        start, size = self.store.offsets[name]
        return flat[start : start + size]

    def layer_slices(self, flat: np.ndarray) -> list[np.ndarray]:
        return [self.layer_slice(flat, name) for name in self.layers.names]

    def hypernetwork_gradients(
        self, client: int, hn: ClientHypernetwork, trained: np.ndarray
    ) -> list[torch.Tensor | None]:
        """``autograd.grad(thetabar_i, hn.parameters(), grad_outputs=-Delta_i)``, streamed.

        ``thetabar_i`` is the model sent this round (``self.sent``); float
        entries only (integer counters are not learnt). ``None`` for a
        parameter no gradient reaches (all-zero alpha, local layers).
        """
        return self.gradients_along(client, hn, lambda name: self.minus_delta_layer(client, trained, name))

    def gradients_along(
        self, client: int, hn: ClientHypernetwork, minus_delta_layer: Callable[[str], np.ndarray]
    ) -> list[torch.Tensor | None]:
        """The hypernetwork gradient for ``-Delta_i`` given per layer by ``minus_delta_layer(name)``.

        ``thetabar_i`` is linear in the weights, so this is the gradient of
        ``sum_{l,j} w_ij^l <theta_j^l, -Delta_i^l>`` over the stored models
        ``theta_j``, one stored layer slice at a time.
        """
        local = self.weights(client, hn)[1] if self.k else []
        dots = np.zeros((len(self.layers), self.num_clients))
        for index, name in enumerate(self.layers.names):
            if index in local:
                continue
            minus_delta = minus_delta_layer(name)
            for j, theta in self.store.iter_layer(self.store.clients(), name):  # the others weigh 0
                dots[index, j] = float(theta.astype(np.float64) @ minus_delta)
        return self.gradients_from_dots(client, hn, dots)

    def gradients_from_dots(self, client: int, hn: ClientHypernetwork, dots: np.ndarray) -> list[torch.Tensor | None]:
        """The gradient of ``sum_{l,j} w_ij^l dots[l, j]`` w.r.t. ``hn``'s parameters.

        ``None`` for a parameter no gradient reaches (all-zero alpha, local
        layers: their rows are constant one-hot, so their dots do not matter).
        """
        weights, _ = self.weights(client, hn)
        surrogate = (weights * torch.from_numpy(dots).to(weights.dtype)).sum()
        params = list(hn.parameters())
        if not surrogate.requires_grad:
            return [None] * len(params)
        return list(torch.autograd.grad(surrogate, params, allow_unused=True))

    # ------------------------------------------------------------- records
    def round_record(self, server_round: int) -> dict[str, Any]:
        """Personalised accuracy over this round's clients, and the weights they got."""
        record: dict[str, Any] = {"registered_clients": len(self.client_of)}
        if self.round_accuracy:
            values = np.array(list(self.round_accuracy.values()))
            record["personal_accuracy"] = {
                "mean": float(values.mean()),
                "std": float(values.std()),
                "min": float(values.min()),
                "max": float(values.max()),
                "clients": len(values),
            }
        if self.round_delta_norm:
            record["delta_norm_mean"] = float(np.mean(list(self.round_delta_norm.values())))
        if self.round_weights:
            record["self_weight"] = {
                name: float(np.mean([w[index, c] for c, w in self.round_weights.items()]))
                for index, name in enumerate(self.layers.names)
            }
        if self.hn_step == "all":
            record["hn_steps_from_stored_delta"] = self.round_stored_steps
        if self.k:
            record["local_layers"] = {str(c): names for c, names in sorted(self.round_local.items())}
        return record

    def write_round_alpha(self, server_round: int) -> Path | None:
        """Every ``alpha_every`` rounds: this round's weights (clients x layers x N) in their own file.

        They are ``L x N`` floats per client, too many for every metrics line.
        """
        if not self.alpha_every or server_round % self.alpha_every or not self.round_weights:
            return None
        clients = sorted(self.round_weights)
        buffer = io.BytesIO()
        np.savez(buffer, clients=np.array(clients), layers=np.array(self.layers.names),
                 weights=np.stack([self.round_weights[c] for c in clients]))
        path = self.workdir / "alpha" / f"round-{server_round:06d}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, buffer.getvalue())
        return path

    def final_report(self, records: list[dict[str, Any]]) -> MethodReport:
        """The final weights (layer x client x client) and the self-weights per round (``pfedla_alpha.npy/.png``)."""
        with torch.no_grad():
            final = np.stack([self.weights(c)[0].numpy() for c in range(self.num_clients)], axis=1)
        self_weights = [(r["round"], r["strategy"]["self_weight"]) for r in records if r.get("strategy", {}).get("self_weight")]
        return MethodReport(layer_weights=LayerWeights(final, self.layers.names, self_weights))

    def summary(self) -> None:
        """Log the method's own settings, then the base strategy's (as Flower's strategies do)."""
        log(
            INFO,
            "\t└──> pFedLA: N=%d embedding=%d hidden=%d hn_lr=%g k=%d hn_step=%s; store %s",
            self.num_clients, self.embedding_dim, self.hidden_dim, self.hn_lr, self.k, self.hn_step, self.workdir,
        )
        super().summary()
