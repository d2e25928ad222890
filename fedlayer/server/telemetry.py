"""What a run shows while it runs: TensorBoard events, ``clients.csv`` (and MLflow), after every round.

The round loop calls ``round_done`` once per round with the line it wrote to
``metrics.jsonl`` (and ``close`` at the end); every scalar comes from that line,
so TensorBoard and ``metrics.jsonl`` agree. TensorBoard (``logging.tensorboard``)
gets, by round:

- ``accuracy/``, ``loss/``, ``central/``, ``train/``, ``federated_evaluation/``: the model's numbers;
- ``traffic/``: bytes each way, FedAvg's, cumulative, the share of FedAvg's, codec resyncs;
- ``layer_bytes_up/<layer>``, ``layer_bytes_down/<layer>`` and their ``_cumulative`` twins;
- ``replies/``: replies, error replies, refused replies, dropped rounds;
- ``<method>/...``: every number of the method's ``round_record``, flattened;
- ``client_<metric>/<client id>``: each client's training loss, training seconds (accepted replies), round trip and bytes.

Accuracy against cumulative bytes is its own run, ``tb/by_bytes``, whose step
is the cumulative traffic in bytes (``accuracy_vs_bytes/central``). Scalars are
TensorBoard's float32 (double-precision ones are invisible to its default, Rust
data loader): a byte count above 2**24 reads back to 7 significant digits. With
``logging.mlflow`` the same scalars go to MLflow (``fedlayer.server.mlflow_run``).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from fedlayer.files import atomic_write
from fedlayer.methods import LayerwiseStrategy
from fedlayer.server.health import ClientHealth, ClientRound
from fedlayer.server.rundir import jsonable

if TYPE_CHECKING:
    from fedlayer.server.mlflow_run import MlflowRun

#: Fields of ``clients.csv``, in order (``ClientHealth.rows``).
CLIENT_FIELDS = (
    "client", "host", "rounds_sampled", "replies", "error_replies", "refusals", "refusal_reasons",
    "median_train_seconds", "median_round_trip_seconds", "bytes_down", "bytes_up",
)
#: Per-round numbers of the metrics line, summed over the run as ``traffic/<name>_cumulative``.
TRAFFIC_FIELDS = ("bytes_up", "bytes_down", "fedavg_bytes_up", "fedavg_bytes_down", "codec_resyncs")
BY_BYTES = "by_bytes"
QUEUE = 100_000

#: TensorBoard's Custom Scalars tab: the charts worth a first look, together.
LAYOUT = {
    "accuracy": {
        "central accuracy by round": ["Multiline", [r"accuracy/central"]],
        "central accuracy by cumulative bytes (step: bytes, both directions)": ["Multiline", [r"accuracy_vs_bytes/central"]],
    },
    "traffic": {
        "bytes per round": ["Multiline", [r"traffic/bytes_(up|down)$"]],
        "cumulative bytes": ["Multiline", [r"traffic/(fedavg_)?bytes_(up|down)_cumulative"]],
        "share of FedAvg's bytes": ["Multiline", [r"traffic/share_of_fedavg.*"]],
        "bytes up by layer": ["Multiline", [r"layer_bytes_up/.*"]],
        "bytes down by layer": ["Multiline", [r"layer_bytes_down/.*"]],
    },
    "health": {
        "replies": ["Multiline", [r"replies/.*"]],
        "client training time (s)": ["Multiline", [r"client_train_seconds/.*"]],
        "client round trip (s)": ["Multiline", [r"client_round_trip_seconds/.*"]],
        "client training loss": ["Multiline", [r"client_train_loss/.*"]],
    },
}


def flatten(value: Any, prefix: str) -> dict[str, float]:
    """The numbers in ``value`` (nested dicts and lists) as ``prefix/key/...`` tags.

    Booleans become 0/1; strings and None (a non-finite value in the metrics line) are left out.
    """
    if isinstance(value, (bool, int, float)):
        return {prefix: float(value)}
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    out: dict[str, float] = {}
    for key, item in items:
        out.update(flatten(item, f"{prefix}/{key}"))
    return out


def round_scalars(line: dict[str, Any], cumulative: dict[str, float], method: str) -> dict[str, float]:
    """Every TensorBoard scalar of one metrics line; ``cumulative`` (running sums) is updated."""
    scalars: dict[str, float] = {}
    for key in ("accuracy", "loss"):
        if line.get(key) is not None:
            scalars[f"{key}/central"] = float(line[key])
    central = {k: v for k, v in (line.get("central") or {}).items() if k not in ("accuracy", "loss")}
    scalars.update(flatten(central, "central"))
    for key in ("train", "federated_evaluation"):
        scalars.update(flatten(line.get(key) or {}, key))
    for key in TRAFFIC_FIELDS:
        cumulative[key] = cumulative.get(key, 0.0) + float(line.get(key, 0))
        scalars[f"traffic/{key}"] = float(line.get(key, 0))
        scalars[f"traffic/{key}_cumulative"] = cumulative[key]
    for direction in ("up", "down"):
        for layer, nbytes in (line.get(f"layer_bytes_{direction}") or {}).items():
            name = f"layer_bytes_{direction}/{layer}"
            cumulative[name] = cumulative.get(name, 0.0) + float(nbytes)
            scalars[name] = float(nbytes)
            scalars[f"layer_bytes_{direction}_cumulative/{layer}"] = cumulative[name]
    fedavg = scalars["traffic/fedavg_bytes_up"] + scalars["traffic/fedavg_bytes_down"]
    fedavg_total = cumulative["fedavg_bytes_up"] + cumulative["fedavg_bytes_down"]
    if fedavg:
        scalars["traffic/share_of_fedavg"] = (scalars["traffic/bytes_up"] + scalars["traffic/bytes_down"]) / fedavg
    if fedavg_total:
        scalars["traffic/share_of_fedavg_cumulative"] = (cumulative["bytes_up"] + cumulative["bytes_down"]) / fedavg_total
    cumulative["rejected"] = cumulative.get("rejected", 0.0) + float(line.get("rejected", 0))
    cumulative["dropped"] = cumulative.get("dropped", 0.0) + float(bool(line.get("update_dropped")))
    scalars.update({
        "replies/replies": float(line.get("replies", 0)),
        "replies/error_replies": float(line.get("error_replies", 0)),
        "replies/rejected": float(line.get("rejected", 0)),
        "replies/rejected_cumulative": cumulative["rejected"],
        "replies/update_dropped": float(bool(line.get("update_dropped"))),
        "replies/dropped_rounds_cumulative": cumulative["dropped"],
    })
    if line.get("seconds") is not None:
        scalars["time/round_seconds"] = float(line["seconds"])
    scalars.update(flatten(line.get("strategy") or {}, method))
    scalars.update(flatten(line.get("privacy") or {}, "privacy"))  # epsilon spent (privacy.mode != off)
    return scalars


def client_scalars(steps: dict[int, ClientRound]) -> dict[str, float]:
    """Each client's numbers of the round, as ``client_<metric>/<client id>``."""
    scalars: dict[str, float] = {}
    for client, step in sorted(steps.items()):
        values = {
            "bytes_up": step.bytes_up,
            "bytes_down": step.bytes_down,
            "train_loss": step.train_loss,
            "train_seconds": step.train_seconds,
            "round_trip_seconds": step.round_trip_seconds,
        }
        scalars.update({f"client_{name}/{client}": float(v) for name, v in values.items() if v is not None})
    return scalars


class Telemetry:
    """Writes one run's TensorBoard events and ``clients.csv`` as rounds complete.

    ``previous``: the metrics lines already written (a resumed run), whose
    cumulative sums continue; TensorBoard drops the events a crash left after them.
    """

    def __init__(
        self,
        cfg: DictConfig,
        run_dir: Path,
        strategy: LayerwiseStrategy,
        health: ClientHealth,
        hosts: dict[str, set[int]],
        previous: list[dict[str, Any]],
    ) -> None:
        self.run_dir = run_dir
        self.strategy = strategy
        self.health = health
        self.hosts = hosts
        self.method = str(cfg.strategy.name)
        self.cumulative: dict[str, float] = {}
        for line in previous:
            round_scalars(line, self.cumulative, self.method)
        #: the last round a resumed run had written (None: a fresh run, or one resumed before round 1 finished)
        self.resumed_after = int(previous[-1]["round"]) if previous else None
        self.cfg = cfg
        self.opened = False
        self.writer = self.by_bytes = None
        self.mlflow: MlflowRun | None = None

    def open(self) -> None:
        """Open the enabled outputs (on the first round: a run that never starts opens nothing)."""
        self.opened = True
        if bool(self.cfg.logging.mlflow):
            from fedlayer.server.mlflow_run import MlflowRun  # only when on: it loads mlflow

            self.mlflow = MlflowRun(self.cfg, self.run_dir)
        if bool(self.cfg.logging.tensorboard):
            from torch.utils.tensorboard import SummaryWriter  # only when on: it loads tensorboard

            resumed = bool(self.cfg.resume)
            # after a crash TensorBoard drops what the lost rounds had written (steps >= purge_step)
            purge_round = (self.resumed_after or 0) + 1 if resumed else None
            purge_bytes = int(self.cumulative.get("bytes_up", 0) + self.cumulative.get("bytes_down", 0)) + 1 if resumed else None
            # a queue that holds a round's scalars: adding one never waits for the writer thread
            self.writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=purge_round, max_queue=QUEUE)
            self.by_bytes = SummaryWriter(str(self.run_dir / "tb" / BY_BYTES), purge_step=purge_bytes)
            if self.resumed_after is None:
                self.writer.add_custom_scalars(LAYOUT)

    def round_done(self, record: dict[str, Any]) -> None:
        """Account the round's clients, write its scalars and ``clients.csv``."""
        if not self.opened:
            self.open()
        steps = self.health.end_round(self.strategy.client_of, self.strategy.rejections)
        line = jsonable(record)
        scalars = round_scalars(line, self.cumulative, self.method)
        scalars.update(client_scalars(steps))
        self.write_clients_csv()
        server_round = int(line["round"])
        if self.mlflow is not None:
            self.mlflow.log_round(scalars, server_round)
        if self.writer is None or self.by_bytes is None:
            return
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, server_round)
        if line.get("accuracy") is not None:
            total = int(self.cumulative["bytes_up"] + self.cumulative["bytes_down"])
            self.by_bytes.add_scalar("accuracy_vs_bytes/central", float(line["accuracy"]), total)
        self.writer.flush()
        self.by_bytes.flush()

    def write_clients_csv(self) -> Path:
        """``clients.csv``: one row per client (``ClientHealth.rows``), replaced atomically."""
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=CLIENT_FIELDS, lineterminator="\n")
        writer.writeheader()
        for row in self.health.rows(self.hosts):
            writer.writerow({k: "" if v is None else f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})
        path = self.run_dir / "clients.csv"
        atomic_write(path, out.getvalue().encode())
        return path

    def close(self) -> None:
        """At the end of the run (its summary and plots written): close the event files, finish the MLflow run."""
        for writer in (self.writer, self.by_bytes):
            if writer is not None:
                writer.close()
        if self.mlflow is not None:
            self.mlflow.finish()
