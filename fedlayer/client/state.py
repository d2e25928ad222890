"""Per-node state saved to disk after every round, so a restarted node continues exactly."""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.common.serde import (
    ProtoRecordDict,
    recorddict_from_proto,
    recorddict_to_proto,
)

from fedlayer.files import atomic_write, keep_newest


class NodeStateFiles:
    """``context.state`` saved to disk after every round, one file per round.

    Flower keeps ``context.state`` in memory only: a SuperNode that restarts,
    or a run resumed after the server died (a new run to Flower), starts with
    an empty one, and every method whose client keeps something between
    rounds (FedLAMA's unsynchronised layers, LAQ's last upload and clock,
    FLL's frozen blocks) would quietly continue from different values. With a
    state folder the client restores, into an empty ``context.state``, what it
    held after its newest round *before* the round it is asked to run, so a
    resumed run that repeats a round the crashed one had already started
    gets exactly the state of the uninterrupted run.

    Files are ``round-NNNNNN.pb`` (Flower's own RecordDict protobuf), written
    crash-safely; the ``keep`` newest are kept: 3, because the server writes
    its checkpoint of round k while round k+1 runs, so a crash in round k+1
    may resume after round k-1 while a client has already saved k and k+1.
    """

    def __init__(self, root: Path, keep: int = 3) -> None:
        self.root = Path(root)
        self.keep = keep

    def rounds(self) -> list[int]:
        """Rounds with a saved state, oldest first."""
        if not self.root.exists():
            return []
        return sorted(int(path.stem.split("-")[1]) for path in self.root.glob("round-*.pb"))

    def path(self, server_round: int) -> Path:
        return self.root / f"round-{server_round:06d}.pb"

    def restore(self, context: Context, before: int) -> int | None:
        """Fill an empty ``context.state`` from the newest round ``< before``; that round, or None."""
        if len(context.state) > 0:
            return None
        earlier = [r for r in self.rounds() if r < before]
        if not earlier:
            return None
        proto = ProtoRecordDict()
        proto.ParseFromString(self.path(earlier[-1]).read_bytes())
        for name, record in recorddict_from_proto(proto).items():
            context.state[name] = record
        return earlier[-1]

    def save(self, context: Context, server_round: int) -> None:
        """Write ``context.state`` as of the end of ``server_round``; drop files now stale.

        Files of rounds ``>= server_round`` came from a run that crashed after
        them and are replaced; an empty state writes nothing.
        """
        for stale in [r for r in self.rounds() if r >= server_round]:
            self.path(stale).unlink(missing_ok=True)
        if len(context.state) == 0:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path(server_round), recorddict_to_proto(context.state).SerializeToString())
        keep_newest([self.path(r) for r in self.rounds()], self.keep)
