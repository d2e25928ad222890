"""Send a round's messages and collect replies, with short polling and a deadline.

Flower's ``Grid.send_and_receive`` sleeps 3 s between pulls; a round here
pulls every ``poll_interval`` seconds instead. Every message pushed and every
reply pulled is counted in the byte ledger, including messages to nodes that
never answer.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Protocol

from flwr.app import Message
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedlayer.traffic import ByteLedger


class ExchangeObserver(Protocol):
    """Per-message sizes and timings of an exchange (``fedlayer.server.health.ClientHealth``)."""

    def sent(self, message: Message, nbytes: int) -> None: ...

    def replied(self, reply: Message, nbytes: int, round_trip: float) -> None: ...


def exchange(
    grid: Grid,
    messages: Iterable[Message],
    *,
    ledger: ByteLedger,
    server_round: int,
    timeout: float,
    poll_interval: float,
    control: bool = False,
    observer: ExchangeObserver | None = None,
) -> list[Message]:
    """Push ``messages``, then pull replies until all arrived or ``timeout`` passed.

    ``control``: the messages are identity queries (see ``ByteLedger.record_down``).
    ``observer`` is told each message's and reply's measured size, and each
    reply's round trip (push to pull, so up to ``poll_interval`` late).
    """
    messages = list(messages)
    if not messages:
        return []
    if control:  # before the round's first train message: say what this exchange is
        log(INFO, "round %d: identifying %d new nodes", server_round, len(messages))
    pushed_at = time.monotonic()
    message_ids = [mid for mid in grid.push_messages(messages) if mid]
    pending = set(message_ids)
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for reply in grid.pull_messages(list(pending)):
            pending.discard(reply.metadata.reply_to_message_id)
            size = ledger.record_up(server_round, reply, control=control)
            if observer is not None:
                observer.replied(reply, size, time.monotonic() - pushed_at)
            replies.append(reply)
        if pending:
            time.sleep(poll_interval)
    # Measured after push (ids are part of what travels) and after the replies,
    # off the path from push to the clients. Measuring only reads the messages
    # (traffic/size.py serialises and hashes nothing), so the simulation engine
    # may pickle them in its worker threads meanwhile.
    for message in messages:
        size = ledger.record_down(server_round, message, control=control)
        if observer is not None:
            observer.sent(message, size)
    if pending:
        log(WARNING, "round %d: %d of %d nodes did not reply within %.0f s", server_round, len(pending), len(message_ids), timeout)
    else:
        log(INFO, "round %d: %d %s", server_round, len(replies), "nodes identified" if control else "replies")
    return replies
