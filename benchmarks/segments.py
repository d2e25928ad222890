"""Where a deployed message's time goes, from the logs of a loopback deployment (issue 27).

``flower_overhead.LoopbackDeployment`` prefixes every line its processes print
with the line's arrival time. From those stamps, per train message, from the
ServerApp's push to the ServerApp's pull of the reply:

- ``pickup``: push (the SuperLink's ``push-messages`` request) to the
  SuperNode's ``Received successfully`` (its idle pull interval, 3 s in Flower 1.39);
- ``superexec_poll``: that to the start of the ``flwr-clientapp`` process
  that answered (its SuperExec's task poll, ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``;
  and, when a process failed (Flower 1.39 refuses the task token of one that
  took too long to start, ``ApiError:1008``) and Flower started another, the
  failed ones: counted as ``failed_starts``);
- ``process_flwr``: process start to its ``Start `flwr-clientapp` process``
  line (Python start and the ``flwr`` import);
- ``app_imports``: that line to the app's imports done: the task pull, the
  FAB, loading the app module and, for fedlayer cold, importing fedlayer and
  torch in the handler (Flower's own app imports torch when it is loaded;
  fedlayer warm imports neither);
- ``handler``: the rest of the handler: the cold build (data split, model,
  first optimizer) and training; warm, the round trip to the warm worker and
  its training;
- ``reply``: the handler's end to the ServerApp's ``confirm-message-received``
  (the ClientApp's push to its SuperNode, the SuperNode's to the SuperLink,
  the ServerApp's reply poll and object pulls).

The ClientApp's side comes from the one line per message that fedlayer's
ClientApp (``fedlayer.client.warm.forward``) and the baseline app log:
``... message answered <warm|cold> in H s (imports I s), A s after the
ClientApp process started``; the process's start is the handler's start less
A (``/proc``, 10 ms ticks). Replies are matched to a node by the SuperLink's
``Push replies from node_id=...`` and to confirmations first come, first
served. Flower itself is not changed; its default INFO logs suffice.

The same line says which path answered: ``answered_paths`` counts every
message of a deployment (any kind) answered warm and cold, and ``fell_back``
flags a warm variant with any cold answer (its times then mix both paths).
"""

from __future__ import annotations

import bisect
import re
import statistics
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: (key, label) of each segment, in the order a message meets them.
SEGMENTS = (
    ("pickup", "SuperNode's idle pick-up (push to received)"),
    ("superexec_poll", "SuperExec's task poll (received to process start)"),
    ("process_flwr", "process start and `flwr` import"),
    ("app_imports", "task pull, app load, fedlayer/torch import"),
    ("handler", "handler: cold build and training (warm: to the worker and back)"),
    ("reply", "reply path (handler end to reply pulled)"),
)
ANSWERED = re.compile(
    r"(\w+) message answered (warm|cold) in ([\d.]+) s \(imports ([\d.]+) s\), ([\d.]+|\?) s after the ClientApp process started"
)
#: fedlayer's forwarding ClientApp's answer line (not the baseline app's), any message kind.
FEDLAYER_ANSWERED = re.compile(r"fedlayer: \w+ message answered (warm|cold) in ")
#: Its warning when the worker was there but could not answer (the reason without its details),
#: and its line when no worker was listening (the reason without the socket's path).
FELL_BACK = re.compile(r"fedlayer: (the warm worker [^(;]*?)\s*(?:\(.*\))?; running cold")
NO_WORKER = re.compile(r"fedlayer: (no warm worker) at .*; running cold")
#: ``fedlayer-client``'s line when its warm worker exited (it restarts it; messages meanwhile run cold).
WORKER_ENDED = re.compile(r"fedlayer-client: (the warm worker ended) \(status")


@dataclass
class Message:
    """One message as a SuperNode's log shows it (times: ``time.time()`` stamps)."""

    kind: str
    receiving: float
    received: float | None = None
    flwr_started: float | None = None
    answered: float | None = None
    path: str = ""
    handler_s: float = 0.0
    imports_s: float = 0.0
    age_s: float | None = None
    process_starts: int = 0


def stamped(path: Path) -> Iterator[tuple[float, str]]:
    """(arrival time, text) of every stamped line of a log."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            stamp, _, text = line.partition(" ")
            try:
                yield float(stamp), text
            except ValueError:
                continue


def node_messages(path: Path) -> tuple[str | None, list[Message]]:
    """A SuperNode log's node id and its messages in order."""
    node_id, messages = None, []
    for t, text in stamped(path):
        if (m := re.search(r"SuperNode ID: (\d+)", text)) is not None:
            node_id = m.group(1)
        elif (m := re.search(r"Receiving: (\w+) message", text)) is not None:
            messages.append(Message(m.group(1), t))
        elif not messages:
            continue
        elif "Received successfully" in text and messages[-1].received is None:
            messages[-1].received = t
        elif "Start `flwr-clientapp` process" in text and messages[-1].answered is None:
            messages[-1].flwr_started = t  # the last one before the answer: Flower may start another when one fails
            messages[-1].process_starts += 1
        elif (m := ANSWERED.search(text)) is not None and messages[-1].answered is None:
            last = messages[-1]
            last.answered, last.path = t, m.group(2)
            last.handler_s, last.imports_s = float(m.group(3)), float(m.group(4))
            last.age_s = None if m.group(5) == "?" else float(m.group(5))
    return node_id, messages


def superlink_events(path: Path) -> tuple[list[float], dict[str, list[float]], list[float]]:
    """The ServerApp's pushes, each node's reply arrivals, and the ServerApp's confirmations of pulled replies."""
    pushes, replies, confirms = [], {}, []
    for t, text in stamped(path):
        if '"POST /v1/runtime/push-messages' in text:
            pushes.append(t)
        elif '"POST /v1/runtime/confirm-message-received' in text:
            confirms.append(t)
        elif (m := re.search(r"Push replies from node_id=(\d+)", text)) is not None:
            replies.setdefault(m.group(1), []).append(t)
    return pushes, replies, confirms


def message_segments(logs: Path) -> list[dict[str, float | str | int]]:
    """Every complete train message of a deployment's logs (``superlink.log``, ``supernode-<i>.log``), its segments in seconds."""
    pushes, replies, confirms = superlink_events(logs / "superlink.log")
    per_node = {}
    for log in sorted(logs.glob("supernode-*.log")):
        node_id, messages = node_messages(log)
        if node_id is not None:
            per_node[log.stem] = (messages, replies.get(node_id, []))
    # each reply arrival takes the first confirmation after it that no earlier arrival took
    arrivals = sorted((t, name, index) for name, (_, times) in per_node.items() for index, t in enumerate(times))
    confirmed: dict[tuple[str, int], float] = {}
    next_confirm = 0
    for t, name, index in arrivals:
        next_confirm = max(next_confirm, bisect.bisect_left(confirms, t))
        if next_confirm < len(confirms):
            confirmed[(name, index)] = confirms[next_confirm]
            next_confirm += 1
    rows = []
    for name, (messages, _) in per_node.items():
        trains = 0
        for index, m in enumerate(messages):
            if m.kind != "train":
                continue
            trains += 1
            pushed = pushes[bisect.bisect_right(pushes, m.receiving) - 1] if pushes and pushes[0] <= m.receiving else None
            done = confirmed.get((name, index))
            if None in (pushed, done, m.received, m.flwr_started, m.answered, m.age_s):
                continue
            handler_start = m.answered - m.handler_s
            process_start = handler_start - m.age_s
            rows.append({
                "node": name, "train_message": trains, "path": m.path, "process_starts": m.process_starts,
                "pickup": m.received - pushed,
                "superexec_poll": process_start - m.received,
                "process_flwr": m.flwr_started - process_start,
                "app_imports": handler_start + m.imports_s - m.flwr_started,
                "handler": m.handler_s - m.imports_s,
                "reply": done - m.answered,
                "total": done - pushed,
            })
    return rows


def medians(rows: Sequence[Mapping[str, float | str | int]], skip_first: bool = True) -> dict[str, float]:
    """Per segment (and ``total``), the median over the messages; ``skip_first`` leaves out each node's
    first train message (round 1) when a node has more. ``messages``: how many were counted."""
    later = [r for r in rows if r["train_message"] > 1]
    counted = later if skip_first and later else list(rows)
    if not counted:
        return {}
    keys = [key for key, _ in SEGMENTS] + ["total"]
    return {**{key: statistics.median(float(r[key]) for r in counted) for key in keys}, "messages": float(len(counted)),
            "failed_starts": float(sum(int(r["process_starts"]) - 1 for r in counted))}


@dataclass
class Paths:
    """How fedlayer's ClientApps of a deployment answered its messages (every kind, every node, every round)."""

    warm: int = 0
    cold: int = 0
    #: reasons logged before answers (the forwarder's fallback warnings, the worker's exits), with their counts
    reasons: dict[str, int] = field(default_factory=dict)

    def __add__(self, other: Paths) -> Paths:
        reasons = dict(self.reasons)
        for reason, count in other.reasons.items():
            reasons[reason] = reasons.get(reason, 0) + count
        return Paths(self.warm + other.warm, self.cold + other.cold, reasons)

    def reasons_text(self) -> str:
        """The reasons as one line ("reason xN; ..."; empty when none was logged)."""
        return "; ".join(f"{reason} x{count}" for reason, count in self.reasons.items())

    def cell(self, variant: str) -> str:
        """``warm / cold`` for a table, marked when a warm variant ran cold (``fell_back``)."""
        text = f"{self.warm} / {self.cold}"
        return f"{text} **RAN COLD**" if fell_back(variant, self) else text


def answered_paths(logs: Path) -> Paths:
    """Messages answered warm and cold, from the ``answered`` lines of a deployment's ``supernode-<i>.log``.

    A reason line counts only when an answer follows it on that node: the
    worker's exit as the deployment stops (status 143) explains no message.
    """
    paths = Paths()
    for log in sorted(logs.glob("supernode-*.log")):
        pending: list[str] = []
        for _, text in stamped(log):
            if (m := FEDLAYER_ANSWERED.search(text)) is not None:
                setattr(paths, m.group(1), getattr(paths, m.group(1)) + 1)
                for reason in pending:
                    paths.reasons[reason] = paths.reasons.get(reason, 0) + 1
                pending.clear()
            elif (m := FELL_BACK.search(text) or NO_WORKER.search(text) or WORKER_ENDED.search(text)) is not None:
                pending.append(m.group(1))
    return paths


def fell_back(variant: str, paths: Paths) -> bool:
    """Whether a warm variant (``warm``, ``warm-idle3``) had a message answered cold: its times then mix both paths."""
    return variant.startswith("warm") and paths.cold > 0


def fallback_warning(label: str, variant: str, paths: Paths) -> str | None:
    """One line to print when ``fell_back``; None otherwise."""
    if not fell_back(variant, paths):
        return None
    why = paths.reasons_text() or "no reason logged"
    return (f"WARNING: {label}: {paths.cold} of {paths.warm + paths.cold} messages ran cold in a warm variant "
            f"({why}); its timings mix warm and cold")


def markdown(columns: Mapping[str, Mapping[str, float]]) -> str:
    """Segments as rows, one column per variant (``columns``: name -> ``medians``)."""
    names = [name for name, values in columns.items() if values]
    if not names:
        return ""
    lines = ["| per train message, median s | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key, label in (*SEGMENTS, ("total", "push to reply pulled")):
        lines.append(f"| {label} | " + " | ".join(f"{columns[name][key]:.2f}" for name in names) + " |")
    lines.append("| messages counted | " + " | ".join(f"{columns[name]['messages']:.0f}" for name in names) + " |")
    lines.append("| ClientApp processes Flower started again (the first failed) | "
                 + " | ".join(f"{columns[name]['failed_starts']:.0f}" for name in names) + " |")
    return "\n".join(lines)
