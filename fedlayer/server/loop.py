"""The server's round loop: train, aggregate, evaluate, account, record."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.serverapp import Grid
from omegaconf import DictConfig, OmegaConf

from fedlayer.data import ArrayDataset
from fedlayer.methods import LayerwiseStrategy
from fedlayer.methods.base import Rejection
from fedlayer.server.artifacts import write_method_report
from fedlayer.plots import plot_run
from fedlayer.wire.records import HOST
from fedlayer.server.builder import build_strategy
from fedlayer.server.checkpoint import Checkpoint, CheckpointStore
from fedlayer.server.exchange import exchange
from fedlayer.server.health import ClientHealth
from fedlayer.server.node_keys import binds_keys, node_keys
from fedlayer.server.rundir import RunDirectory
from fedlayer.server.telemetry import Telemetry
from fedlayer.traffic import ByteLedger
from fedlayer.traffic.size import trained_model_bytes
from fedlayer.training import Evaluator
from fedlayer.workload import build_configured_model, load_workload

#: How Flower 1.39's simulation engine reports a client whose Ray actor died (its Ray node
#: left): the vce ``worker`` (flwr/server/superlink/fleet/vce/vce_api.py) answers code UNKNOWN
#: and reason ``str(type(ex)) + ":<'...'>"`` with Ray's actor error as ``ex``. A ClientApp's own
#: exception reaches that worker wrapped in ``ClientAppException`` (simulation/ray_transport/
#: ray_actor.py), so it gets code CLIENT_APP_RAISED_EXCEPTION and a reason that starts
#: ``<class 'ray.exceptions.RayTaskError(ClientAppException)'>``: a client cannot forge this one.
ACTOR_DIED = (ErrorCode.UNKNOWN, ("<class 'ray.exceptions.ActorDiedError'>", "<class 'ray.exceptions.RayActorError'>"))


class RunStopped(RuntimeError):
    """The run cannot go on; its last checkpoint stays, and ``resume=`` continues it."""


class BudgetSpent(Exception):
    """The next round would exceed ``privacy.target_epsilon``: the run ends normally before it."""


class FederatedRun:
    """One federated run of a configured strategy over a Flower grid."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        workload = load_workload(cfg, int(cfg.federation.num_clients))
        self.strategy: LayerwiseStrategy = build_strategy(cfg, workload)
        self.strategy.bindings.enabled = binds_keys(str(cfg.identity.bind))
        self.ledger = ByteLedger(self.strategy.exchanged_layers(), trained_model_bytes(self.strategy.fedavg_state()))
        self.evaluator = central_evaluator(cfg, workload.central_test)
        self.rundir = RunDirectory.create(cfg)
        self.rundir.clear_error()
        self.strategy.attach_run_dir(self.rundir.path)
        self.strategy.run_key = self.rundir.run_key
        self.checkpoints = CheckpointStore(self.rundir.path, keep=int(cfg.checkpoint_keep))
        self.last_accuracy: float | None = None
        self.last_local_accuracy: float | None = None
        self.elapsed_before = 0.0
        #: hostname -> client ids whose train replies came from it; Ray node ids seen
        self.hosts: dict[str, set[int]] = {}
        self.ray_nodes: set[str] = set()
        self.first_round = 1
        #: why the run ended before its last round (``privacy.target_epsilon``); None: it did not
        self.privacy_stop: str | None = None
        self.health = ClientHealth()
        #: whether enough nodes connected for this process's first round (``connected_nodes``)
        self.started = False
        if cfg.resume:
            self.restore()
        if cfg.identity.release:
            self.strategy.release_bindings(int(c) for c in cfg.identity.release)
        self.telemetry = Telemetry(cfg, self.rundir.path, self.strategy, self.health, self.hosts, self.rundir.read_metrics() if cfg.resume else [])

    def restore(self) -> None:
        """Continue from the newest good checkpoint of this run directory."""
        checkpoint = self.checkpoints.latest()
        if checkpoint is None:
            log(WARNING, "resume: no usable checkpoint in %s; starting from round 1", self.rundir.path)
            self.rundir.truncate_metrics(0)
            return
        self.strategy.global_state = checkpoint.global_state
        try:
            self.strategy.load_state_dict(checkpoint.strategy_state)
        except KeyError as missing:  # a checkpoint of a fedlayer whose state dataclass had other fields
            raise RunStopped(f"resume: the checkpoint in {self.rundir.path} lacks the method's state ({missing.args[0]}): written by another fedlayer version? Start a new run") from None
        self.ledger.load_state_dict(checkpoint.ledger_state)
        extra = checkpoint.extra
        self.strategy.rejections = [Rejection(**r) for r in extra["rejections"]]
        self.last_accuracy = extra["last_accuracy"]
        self.last_local_accuracy = extra["last_local_accuracy"]
        self.elapsed_before = float(extra["wall_seconds"])
        self.hosts = {host: set(clients) for host, clients in extra.get("hosts", {}).items()}
        self.ray_nodes = set(extra.get("ray_nodes", []))
        self.health.load_state_dict(extra.get("client_health", {"rejections_seen": len(self.strategy.rejections)}))
        self.first_round = checkpoint.round + 1
        self.rundir.truncate_metrics(checkpoint.round)
        log(INFO, "resume: continuing %s after round %d", self.rundir.path, checkpoint.round)

    def save_checkpoint(self, server_round: int, elapsed: float) -> None:
        """Checkpoint the completed round (model, strategy, ledger, bookkeeping), written while the next round
        runs (``CheckpointStore.save_in_background``; ``run`` joins the last write before it returns or raises)."""
        self.checkpoints.save_in_background(
            Checkpoint(
                round=server_round,
                global_state=self.strategy.global_state,
                strategy_state=self.strategy.state_dict(),
                ledger_state=self.ledger.state_dict(),
                extra={
                    "rejections": [asdict(r) for r in self.strategy.rejections],
                    "last_accuracy": self.last_accuracy,
                    "last_local_accuracy": self.last_local_accuracy,
                    "wall_seconds": elapsed,
                    "hosts": {host: sorted(clients) for host, clients in self.hosts.items()},
                    "ray_nodes": sorted(self.ray_nodes),
                    "client_health": self.health.state_dict(),
                },
            )
        )

    def run(self, grid: Grid) -> dict[str, Any]:
        """Run all rounds; returns the summary (also written to summary.json)."""
        rounds = int(self.cfg.federation.rounds)
        log(INFO, "fedlayer: %s on %s, %d rounds; run directory %s", self.cfg.strategy.name, self.cfg.dataset.name, rounds, self.rundir.path)
        self.strategy.summary()
        started = time.time() - self.elapsed_before
        round_ends = [time.time()]  # when this process started, then when each of its rounds ended
        try:
            for server_round in range(self.first_round, rounds + 1):
                try:
                    record = self.run_round(grid, server_round, last=server_round == rounds)
                except BudgetSpent as spent:
                    self.privacy_stop = str(spent)
                    log(INFO, "fedlayer: privacy budget reached; the run ends before %s", spent)
                    break
                except RunStopped as stopped:
                    self.rundir.write_error(str(stopped))
                    raise
                nonfinite = self.rundir.append_metrics(record)
                if nonfinite:
                    log(WARNING, "round %d: non-finite metrics written as null: %s", server_round, ", ".join(nonfinite))
                self.telemetry.round_done(record)
                self.save_checkpoint(server_round, time.time() - started)
                round_ends.append(time.time())
                eta = time_left(round_ends, rounds - server_round)
                log(INFO, "%s", progress_line(record, rounds, self.ledger.totals(), round_ends[-1] - started, eta))
        finally:
            self.checkpoints.wait()  # the last checkpoint is complete before the run returns or raises
        summary = self.summary(time.time() - started)
        self.rundir.write_summary(summary)
        records = self.rundir.read_metrics()
        plot_run(records, self.rundir.path / "accuracy.png", f"{self.cfg.strategy.name} on {self.cfg.dataset.name}")
        write_method_report(self.strategy.final_report(records), self.rundir.path)
        self.telemetry.close()
        log(INFO, "fedlayer: finished; summary in %s", self.rundir.path / "summary.json")
        return summary

    def _exchange(self, grid: Grid, messages: Any, server_round: int, control: bool = False) -> list[Any]:
        federation = self.cfg.federation
        return exchange(
            grid,
            messages,
            ledger=self.ledger,
            server_round=server_round,
            timeout=float(federation.round_timeout),
            poll_interval=float(federation.poll_interval),
            control=control,
            observer=self.health,
        )

    def connected_nodes(self, grid: Grid) -> list[int]:
        """The connected nodes, once enough are; ``RunStopped`` after ``federation.wait_timeout`` s without.

        Enough: ``min_available_nodes`` (null: ``num_clients``) before the first
        round this process runs; after it ``min_train_nodes``, so a node that
        died never holds the run up while the others can train.
        """
        federation = self.cfg.federation
        field = "min_train_nodes" if self.started else "min_available_nodes"
        needed = int(federation.min_train_nodes if self.started else federation.min_available_nodes or federation.num_clients)
        timeout = float(federation.wait_timeout)
        deadline = time.monotonic() + timeout
        while len(node_ids := sorted(grid.get_node_ids())) < needed:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RunStopped(
                    f"only {len(node_ids)} of the {needed} nodes needed (federation.{field}) connected within "
                    f"federation.wait_timeout={timeout:g} s; the run stopped: continue it with resume={self.rundir.path}"
                )
            log(INFO, "Waiting for nodes: %d connected, %d needed (federation.%s), %.0f s left", len(node_ids), needed, field, left)
            time.sleep(min(1.0, left))
        self.started = True
        return node_ids

    def identify_nodes(self, grid: Grid, server_round: int) -> list[int]:
        """Ask nodes seen for the first time which client they are (see ``methods.replies``);
        the connected nodes whose client id is known (only those are sampled)."""
        connected = self.connected_nodes(grid)
        queries = self.strategy.identity_queries(connected)
        if queries:
            replies = self._exchange(grid, queries, server_round, control=True)
            keys = node_keys(grid) if self.strategy.bindings.enabled else None
            self.strategy.register_identities(server_round, replies, connected, keys)
        return self.strategy.identified(connected)

    def run_round(self, grid: Grid, server_round: int, last: bool) -> dict[str, Any]:
        """One round; returns its metrics line."""
        started = time.time()
        rejected_before = len(self.strategy.rejections)  # identity answers refused count in the round too
        identified = self.identify_nodes(grid, server_round)
        if (problem := self.strategy.privacy_budget_problem(server_round, len(identified))) is not None:
            raise BudgetSpent(problem)
        train_messages = self.strategy.configure_train(server_round, identified)
        replies = self._exchange(grid, train_messages, server_round)
        self.note_hosts(replies)
        self.stop_if_ray_nodes_died(server_round, replies, in_simulation(grid))
        answered = sum(not reply.has_error() for reply in replies)
        record: dict[str, Any] = {"round": server_round, "replies": len(replies), "error_replies": len(replies) - answered}
        # None (model unchanged) when fewer than min_replies replies are accepted
        train_metrics = self.strategy.aggregate_train(server_round, replies, min_replies=int(self.cfg.federation.min_replies))
        record["train"] = train_metrics
        if train_metrics and "local-test-accuracy" in train_metrics:
            self.last_local_accuracy = float(train_metrics["local-test-accuracy"])
        record["update_dropped"] = server_round in self.strategy.dropped_rounds
        if self.strategy.fraction_evaluate > 0:  # else no wait for nodes to evaluate
            evaluate_messages = self.strategy.configure_evaluate(server_round, self.connected_nodes(grid))
            replies = self._exchange(grid, evaluate_messages, server_round)
            record["federated_evaluation"] = self.strategy.aggregate_evaluate(server_round, replies) if replies else None
        record["rejected"] = len(self.strategy.rejections) - rejected_before
        if last or server_round % int(self.cfg.evaluation.every) == 0:
            central = self.strategy.evaluate_central(self.evaluator)
            if not math.isfinite(float(central["loss"])):
                raise RunStopped(
                    f"round {server_round}: the global model's central loss is {central['loss']}: "
                    "the model is no longer usable, the run stops (resume= continues from the last checkpoint)"
                )
            self.last_accuracy = central["accuracy"]
            record.update(accuracy=central["accuracy"], loss=central["loss"])
            record["central"] = central
        traffic = self.ledger.rounds.get(server_round)
        if traffic is not None:
            record.update(
                bytes_up=traffic.bytes_up,
                bytes_down=traffic.bytes_down,
                fedavg_bytes_up=traffic.fedavg_bytes_up,
                fedavg_bytes_down=traffic.fedavg_bytes_down,
                layer_bytes_up=dict(traffic.layer_bytes_up),
                layer_bytes_down=dict(traffic.layer_bytes_down),
                codec_resyncs=traffic.codec_resyncs,
            )
        else:
            record.update(bytes_up=0, bytes_down=0, fedavg_bytes_up=0, fedavg_bytes_down=0)
        record["strategy"] = self.strategy.round_record(server_round)
        if self.strategy.codec is not None:  # encode + decode seconds, server's and clients' (issue #26)
            record["codec"] = self.strategy.codec.round_record()
        if (spent := self.strategy.privacy_spent()) is not None:
            record["privacy"] = spent
        record["seconds"] = time.time() - started
        return record

    def stop_if_ray_nodes_died(self, server_round: int, replies: list[Any], simulation: bool) -> None:
        """Stop (``RunStopped``) when the simulation engine reports clients' Ray actors dead:
        a Ray node left the cluster.

        Flower's actor pool keeps handing work to the dead actors, so going on
        would reject those clients' replies every round. The round is not
        aggregated; the run resumes from the previous round's checkpoint. Only
        the engine's own error (``ACTOR_DIED``) counts, and only in simulation:
        in deployment an error's reason is whatever a ClientApp raised.
        """
        code, reasons = ACTOR_DIED
        died = [r for r in replies if simulation and r.has_error() and r.error.code == code and r.error.reason.startswith(reasons)]
        if died:
            raise RunStopped(
                f"round {server_round}: the Ray actors of {len(died)} clients died (a Ray node left the cluster); "
                f"the run stopped after round {server_round - 1}: continue it with resume={self.rundir.path}"
            )

    def note_hosts(self, replies: list[Any]) -> None:
        """Remember where each client's train replies were computed (the ``host`` record)."""
        for reply in replies:
            record = None if reply.has_error() else reply.content.config_records.get(HOST)
            if record is None or reply.metadata.src_node_id not in self.strategy.client_of:
                continue
            client = self.strategy.client_id(reply.metadata.src_node_id)
            self.hosts.setdefault(str(record.get("hostname")), set()).add(client)
            if "ray-node-id" in record:
                self.ray_nodes.add(str(record["ray-node-id"]))

    def summary(self, wall_seconds: float) -> dict[str, Any]:
        """The run's headline numbers."""
        cfg = self.cfg
        totals = self.ledger.totals()
        fedavg_total = totals["fedavg_bytes_up"] + totals["fedavg_bytes_down"]
        total = totals["bytes_up"] + totals["bytes_down"]
        partition = cfg.dataset.partition
        return {
            "strategy": cfg.strategy.name,
            "dataset": cfg.dataset.name,
            "model": cfg.model.name,
            "partition": partition_label(partition),
            "num_clients": int(cfg.federation.num_clients),
            "rounds": int(cfg.federation.rounds),
            "seed": int(cfg.seed),
            "final_accuracy": self.last_accuracy,
            "final_local_test_accuracy": self.last_local_accuracy,
            **totals,
            "bytes_total": total,
            "fedavg_bytes_total": fedavg_total,
            "traffic_ratio_vs_fedavg": total / fedavg_total if fedavg_total else None,
            "uplink_ratio_vs_fedavg": totals["bytes_up"] / totals["fedavg_bytes_up"] if totals["fedavg_bytes_up"] else None,
            "privacy": self.privacy_summary(),
            "rejected_replies": len(self.strategy.rejections),
            "dropped_updates": len(self.strategy.dropped_rounds),
            "nonfinite_metrics": sum(len(r.get("nonfinite", [])) for r in self.rundir.read_metrics()),
            **codec_seconds(self.rundir.read_metrics()),
            "wall_seconds": wall_seconds,
            "hosts": {host: sorted(clients) for host, clients in sorted(self.hosts.items())},
            "ray_nodes": sorted(self.ray_nodes),
            "run_dir": str(self.rundir.path),
            "strategy_params": {k: v for k, v in OmegaConf.to_container(cfg.strategy, resolve=True).items() if k != "name"},
        }

    def privacy_summary(self) -> dict[str, Any] | None:
        """The privacy spent (None: off), the settings, and why the run stopped early if the budget did it."""
        spent = self.strategy.privacy_spent()
        if spent is None:
            return None
        privacy = self.strategy.privacy
        # adaptive clipping: ``clip`` is the one in force at the end (``spent`` has it)
        return {"mode": privacy.mode, "clip": privacy.clip, "noise_multiplier": privacy.noise_multiplier,
                "target_epsilon": privacy.target_epsilon, **spent, "stopped": self.privacy_stop}


def codec_seconds(lines: list[dict[str, Any]]) -> dict[str, float]:
    """The codec's seconds per round (the server's plus a client's mean: what a round waits for) and their share of
    the rounds' seconds; empty without the codec."""
    rounds = [line for line in lines if "codec" in line and "seconds" in line]
    if not rounds:
        return {}
    per_round = [line["codec"]["server_seconds"] + line["codec"]["client_seconds_mean"] for line in rounds]
    wall = sum(line["seconds"] for line in rounds)
    return {"codec_seconds_per_round": sum(per_round) / len(rounds), "codec_seconds_share": sum(per_round) / wall if wall else 0.0}


def in_simulation(grid: Grid) -> bool:
    """Whether ``grid`` is the simulation engine's (Flower's ``InMemoryGrid``, whose module
    is loaded wherever one exists; importing it here would load the SuperLink's database stack)."""
    module = sys.modules.get("flwr.superlink.grid.inmemory_grid")
    return module is not None and isinstance(grid, module.InMemoryGrid)


def central_evaluator(cfg: DictConfig, test_set: ArrayDataset) -> Evaluator:
    """The configured model on (a fixed, seeded sample of at most ``evaluation.max_examples`` of) the test set."""
    limit = int(cfg.evaluation.max_examples)
    if limit and len(test_set) > limit:
        rng = np.random.default_rng(int(cfg.seed))
        test_set = test_set.subset(np.sort(rng.choice(len(test_set), limit, replace=False)))
    return Evaluator(build_configured_model(cfg, test_set), test_set)


def partition_label(partition: DictConfig) -> str:
    """A short label such as ``iid``, ``dirichlet(0.1)`` or ``pathological(2)``."""
    if partition.scheme == "dirichlet":
        return f"dirichlet({partition.alpha})"
    if partition.scheme == "pathological":
        return f"pathological({partition.classes_per_client})"
    return str(partition.scheme)


def time_left(round_ends: list[float], rounds_left: int) -> float:
    """Seconds the ``rounds_left`` rounds should take, at the mean pace of this process's rounds.

    ``round_ends``: the process's start, then the end of each of its rounds (a resumed run's
    earlier rounds may have run elsewhere). The first round also starts the clients (Ray
    workers, data): it is left out once a later round has ended.
    """
    ends = round_ends[1:] if len(round_ends) > 2 else round_ends
    return (ends[-1] - ends[0]) / (len(ends) - 1) * rounds_left


def duration(seconds: float) -> str:
    """``seconds`` as a short duration: ``42s``, ``3m07s``, ``2h05m``."""
    whole = max(0, round(seconds))
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def progress_line(record: dict[str, Any], rounds: int, totals: dict[str, int], elapsed: float, eta: float) -> str:
    """One line of progress for the log: round k/N, the model, the traffic, the round's time, the
    run's elapsed time (resumed runs: with the rounds before) and the estimated time left (``eta``)."""
    acc = record.get("accuracy")
    acc_text = f"acc {acc:.4f}" if acc is not None else "acc -"
    fedavg = totals["fedavg_bytes_up"] + totals["fedavg_bytes_down"]
    share = (totals["bytes_up"] + totals["bytes_down"]) / fedavg if fedavg else 0.0
    return (
        f"[round {record['round']}/{rounds}] {acc_text} | up {record['bytes_up'] / 1e6:.2f} MB"
        f" down {record['bytes_down'] / 1e6:.2f} MB | cumulative {share:.1%} of FedAvg"
        f" | {record['replies']} replies, {record['rejected']} rejected | {record['seconds']:.1f} s"
        f" | elapsed {duration(elapsed)}, ETA {duration(eta)}"
    )
