"""FedLAMA (Lee et al., AAAI 2023): layer-wise adaptive aggregation intervals.

Each layer ``l`` is synchronised every ``tau_l`` local steps, ``tau_l`` in
``{tau', phi * tau'}``; one fedlayer round is ``tau'`` local steps, so a layer
is due in round ``r`` iff ``r % interval_l == 0`` with ``interval_l`` in
``{1, phi}`` rounds. Only due layers travel, in both directions; the others
stay on the device and keep training there (the standard client keeps its full
model in ``context.state``).

Rounds come in *phi-blocks* (rounds ``k*phi+1 .. (k+1)*phi``): the cohort is
sampled at a block's first round and kept for the whole block, the first round
of a block sends every layer (a new member may hold stale layers from an
earlier block, or none), and its last round synchronises every layer. At the
end of a block (after round ``min_round_to_adjust + 1``) intervals are
re-assigned from the layers' discrepancies: small-discrepancy, large layers
get ``phi``. ``phi = 1`` is FedAvg exactly.

Differences from the reference code (swblaster/FedLAMA, ``solvers/fedlama.py``):
the unit of an interval is a whole layer (module), as in the paper; the
reference lets only ``kernel`` tensors take the long interval while biases and
BatchNorm tensors sync every round, which fedlayer's whole-layer transfer does
not express (``long_interval_tensors: weights_only`` is refused). ``d_l`` is
the ``p_i``-weighted mean of ALGORITHMS.md (the reference averages unweighted).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.common.logger import log
from flwr.serverapp import Grid
from omegaconf import DictConfig

from fedlayer.layers import ModelLayers, State
from fedlayer.strategies.base import LayerwiseStrategy, NodePlan, weighted_layer_average
from fedlayer.strategies.validation import TrainReply

#: Values of ``strategy.long_interval_tensors`` and whether fedlayer implements them.
LONG_INTERVAL_TENSORS = {"whole_layer": True, "weights_only": False}


def layer_discrepancy(
    average: State, replies: Sequence[TrainReply], layers: ModelLayers, name: str, steps: float
) -> float | None:
    """``d_l = sum_i p_i ||u_l - x_l^i||^2 / (tau_l * dim_l)`` over the replies holding ``name``.

    ``u_l`` is the new average, ``p_i`` the reply's share of the holders'
    examples, ``tau_l`` = ``steps`` local steps since the last synchronisation,
    ``dim_l`` the number of floating-point scalars of the layer (integer
    counters such as ``num_batches_tracked`` are left out). None when no reply
    holds the layer.
    """
    holders = [r for r in replies if name in r.layer_names]
    if not holders:
        return None
    keys = [k for k in layers[name].keys if np.issubdtype(average[k].dtype, np.floating)]
    dim = sum(average[k].size for k in keys)
    if dim == 0:
        return 0.0
    total = float(sum(r.num_examples for r in holders))
    squared = 0.0
    for reply in holders:
        norm = sum(float(np.sum((average[k].astype(np.float64) - reply.state[k].astype(np.float64)) ** 2)) for k in keys)
        squared += reply.num_examples / total * norm
    return squared / (steps * dim)


def long_interval_layers(discrepancy: dict[str, float], sizes: dict[str, int]) -> list[str]:
    """Layers that get the long interval ``phi * tau'`` (ALGORITHMS.md 1, step 3).

    Sort layers by ``d_l`` ascending and walk the list with
    ``delta_k = sum_{j<=k} d_j dim_j / sum_j d_j dim_j`` (share of the total
    discrepancy) and ``lambda_k = sum_{j<=k} dim_j / sum_j dim_j`` (share of the
    parameters); every layer up to and including the first ``k`` with
    ``delta_k >= 1 - lambda_k`` is returned. The walk always ends (at the last
    layer ``1 - lambda = 0``), so at least one layer is returned; when every
    discrepancy is zero all layers are. Ties in ``d_l`` keep model order.
    """
    order = sorted(discrepancy, key=lambda name: discrepancy[name])  # stable: model order on ties
    total_d = sum(discrepancy[n] * sizes[n] for n in order)
    total_size = sum(sizes[n] for n in order)
    chosen: list[str] = []
    acc_d = acc_size = 0.0
    for name in order:
        acc_d += discrepancy[name] * sizes[name]
        acc_size += sizes[name]
        chosen.append(name)
        delta = acc_d / total_d if total_d > 0 else 0.0
        if delta >= 1.0 - acc_size / total_size:
            break
    return chosen


class FedLAMAStrategy(LayerwiseStrategy):
    """Layer-wise adaptive model aggregation (FedLAMA).

    Parameters
    ----------
    initial_state : State
        The initial global model.
    tau_prime : int
        Local steps per round (``train.local_steps``); 0 when a round is
        ``train.local_epochs`` passes, and the discrepancy is then per round.
    phi : int
        Interval increase factor: long intervals are ``phi`` rounds, and the
        cohort and intervals change every ``phi`` rounds. 1 is FedAvg.
    min_round_to_adjust : int
        Intervals are first re-assigned at a block end ``r`` with
        ``r - 1 > min_round_to_adjust`` (the reference's ``epoch_id > 5``,
        counted from 0); until then every layer syncs every round.
    **kwargs
        ``LayerwiseStrategy`` arguments (sampling, seed).
    """

    method = "fedlama"
    client_keeps_model = True  # layers not due keep evolving on the device

    def __init__(
        self,
        initial_state: State,
        *,
        tau_prime: int = 0,
        phi: int = 2,
        min_round_to_adjust: int = 5,
        **kwargs: Any,
    ) -> None:
        super().__init__(initial_state, **kwargs)
        self.tau_prime = tau_prime
        self.phi = phi
        self.min_round_to_adjust = min_round_to_adjust
        self.intervals: dict[str, int] = {name: 1 for name in self.layers.names}
        self.discrepancy: dict[str, float | None] = {name: None for name in self.layers.names}
        self.cohort: list[int] = []
        self.sizes = {
            layer.name: sum(
                int(np.prod(s)) for s, d in zip(layer.shapes, layer.dtypes) if np.issubdtype(np.dtype(d), np.floating)
            )
            for layer in self.layers
        }
        self._record: dict[str, Any] = {}

    # ---------------------------------------------------------- construction
    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        from fedlayer.config import ConfigError

        strategy = cfg.strategy
        if not isinstance(strategy.phi, int) or strategy.phi < 1:
            raise ConfigError("strategy.phi", f"must be an integer >= 1, got {strategy.phi!r}")
        if not isinstance(strategy.min_round_to_adjust, int) or strategy.min_round_to_adjust < 0:
            raise ConfigError(
                "strategy.min_round_to_adjust", f"must be an integer >= 0, got {strategy.min_round_to_adjust!r}"
            )
        if strategy.tau_prime != cfg.train.local_steps:
            raise ConfigError(
                "strategy.tau_prime",
                f"one FedLAMA round is train.local_steps local steps; tau_prime ({strategy.tau_prime!r}) "
                f"must equal train.local_steps ({cfg.train.local_steps}): set train.local_steps instead",
            )
        mode = strategy.long_interval_tensors
        if mode not in LONG_INTERVAL_TENSORS:
            raise ConfigError(
                "strategy.long_interval_tensors", f"must be one of {sorted(LONG_INTERVAL_TENSORS)}, got {mode!r}"
            )
        if not LONG_INTERVAL_TENSORS[mode]:
            raise ConfigError(
                "strategy.long_interval_tensors",
                "weights_only (the reference code's per-tensor intervals) is not implemented: fedlayer moves "
                "whole layers (modules); use whole_layer (the paper's rule)",
            )

    @classmethod
    def method_kwargs(cls, cfg: DictConfig) -> dict[str, Any]:
        return {
            "tau_prime": int(cfg.strategy.tau_prime),
            "phi": int(cfg.strategy.phi),
            "min_round_to_adjust": int(cfg.strategy.min_round_to_adjust),
        }

    # ------------------------------------------------------------ schedule
    def block_start(self, server_round: int) -> bool:
        """True at the first round of a phi-block (rounds count from 1)."""
        return (server_round - 1) % self.phi == 0

    def due(self, server_round: int) -> list[str]:
        """Layers synchronised (uploaded and averaged) in this round, model order."""
        return [name for name in self.layers.names if server_round % self.intervals[name] == 0]

    def sample_nodes(self, server_round: int, node_ids: list[int]) -> list[int]:
        """A fresh cohort at a block start; otherwise the block's cohort (still connected).

        The cohort is kept as client ids, so it survives nodes reconnecting
        under new node ids and a resumed run.
        """
        if self.block_start(server_round) or not self.cohort:
            chosen = super().sample_nodes(server_round, node_ids)
            self.cohort = [self.client_id(node) for node in chosen]
            return chosen
        members = set(self.cohort)
        return [node for node in node_ids if self.client_id(node) in members]

    def plan(self, server_round: int, node_id: int) -> NodePlan:
        """Down: everything at a block start, else the layers averaged last round
        (the short-interval ones). Up: the layers due this round."""
        if self.block_start(server_round):
            send = self.layers.names
        else:
            send = [name for name in self.layers.names if self.intervals[name] == 1]
        return NodePlan(send=send, request=self.due(server_round))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Start this round's record with the intervals in force, then plan as usual."""
        self._record = {"intervals": dict(self.intervals), "synced": [], "reassigned": False}
        return super().configure_train(server_round, arrays, config, grid)

    # ---------------------------------------------------------- aggregation
    def aggregate(self, server_round: int, replies: list[TrainReply]) -> State:
        """Average the due layers, measure their discrepancy, re-assign at block ends."""
        update = weighted_layer_average(replies, self.layers, self.due(server_round))
        synced = self.layers.layers_in(update.keys())
        for name in synced:
            steps = self.intervals[name] * max(self.tau_prime, 1)
            self.discrepancy[name] = layer_discrepancy(update, replies, self.layers, name, steps)
        self._record["synced"] = synced
        if server_round % self.phi == 0 and server_round - 1 > self.min_round_to_adjust:
            self._record["reassigned"] = self.reassign()
        return update

    def reassign(self) -> bool:
        """New intervals from the latest discrepancies; False (unchanged) while
        some layer has never been measured."""
        measured = {name: d for name, d in self.discrepancy.items() if d is not None}
        if len(measured) < len(self.layers):
            return False
        long = set(long_interval_layers(measured, self.sizes))
        self.intervals = {name: self.phi if name in long else 1 for name in self.layers.names}
        return True

    # -------------------------------------------------------------- records
    def round_record(self, server_round: int) -> dict[str, Any]:
        """Interval (rounds) each layer had this round, the layers synchronised,
        every layer's latest discrepancy, and whether intervals were re-assigned."""
        return {**self._record, "discrepancy": dict(self.discrepancy), "cohort_size": len(self.cohort)}

    def write_artifacts(self, run_dir: Path, records: list[dict[str, Any]]) -> None:
        """``intervals.png``: each layer's interval (rounds) per round, as a heatmap."""
        rows = [(r["round"], r["strategy"]["intervals"]) for r in records if r.get("strategy", {}).get("intervals")]
        if not rows:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = self.layers.names
        grid = np.array([[intervals.get(name, 1) for _, intervals in rows] for name in names], dtype=float)
        fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(rows) + 2), max(2.5, 0.35 * len(names) + 1)))
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=1, vmax=max(self.phi, 2), interpolation="nearest")
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_xticks(range(len(rows)), [str(r) for r, _ in rows], fontsize=6)
        ax.set_xlabel("round")
        ax.set_title(f"FedLAMA intervals (rounds), phi={self.phi}")
        fig.colorbar(image, ax=ax, label="interval (rounds)")
        fig.tight_layout()
        fig.savefig(run_dir / "intervals.png", dpi=100)
        plt.close(fig)

    # ---------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "intervals": dict(self.intervals),
            "discrepancy": dict(self.discrepancy),
            "cohort": list(self.cohort),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.intervals = {name: int(state["intervals"][name]) for name in self.layers.names}
        self.discrepancy = {name: state["discrepancy"].get(name) for name in self.layers.names}
        self.cohort = [int(node) for node in state["cohort"]]

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t└──> FedLAMA tau'=%d steps, phi=%d, adjust after round %d", self.tau_prime, self.phi, self.min_round_to_adjust + 1)
