"""What one exchange sent, and whether a reply answers it.

Flower gives a message its id when it is pushed, on the very ``Message``
object pushed: the deployment grid (``GrpcGrid``/``HttpGrid``) sets it to the
message's object id, the simulation's ``InMemoryGrid`` to a fresh uuid4, and
``push_messages`` returns the same ids. A strategy keeps the messages of each
exchange (training, evaluation, identity queries) in an ``Outbox`` and reads
their ids after the push. A reply is taken only if it answers the message that
exchange sent to its sender: ``reply_to_message_id`` is that message's id, its
``src_node_id`` the message's ``dst_node_id``, its type the message's type and
its round the exchange's. Flower's SuperLink stores only such replies, but
fedlayer checks them itself (simulation, other transports, defence in depth);
everything else is refused, so a stale, future, misdirected or other-type reply
never touches server state.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, Message

from fedlayer.methods.replies import ReplyRejected
from fedlayer.wire.records import CONFIG, SERVER_ROUND


@dataclass
class Outbox:
    """The messages of one exchange, by destination node."""

    #: the round the messages were sent in (None: identity queries, asked between rounds)
    server_round: int | None
    message_type: str
    by_node: dict[int, Message] = field(default_factory=dict)

    @classmethod
    def of(cls, server_round: int | None, message_type: str, messages: Iterable[Message]) -> Outbox:
        """The outbox of ``messages`` (all of ``message_type``), sent in ``server_round``."""
        return cls(server_round, message_type, {m.metadata.dst_node_id: m for m in messages})

    def message(self, node_id: int) -> Message | None:
        """The message sent to ``node_id`` (None: none was)."""
        return self.by_node.get(node_id)

    def check(self, server_round: int, reply: Message) -> None:
        """Raise ``ReplyRejected`` unless ``reply`` answers the message this exchange sent its node in ``server_round``."""
        problem = self.problem(server_round, reply)
        if problem is not None:
            if reply.has_error():  # say what the node (or the grid) reported, too
                problem += f" (its error: {reply.error.reason})"
            raise ReplyRejected(reply.metadata.src_node_id, problem)

    def problem(self, server_round: int, reply: Message) -> str | None:
        """Why ``reply`` does not answer this exchange's message to its node (None: it does)."""
        node = reply.metadata.src_node_id
        kind = self.message_type
        if reply.metadata.message_type != kind:
            return f"a {reply.metadata.message_type!r} reply offered as a {kind!r} reply"
        if self.server_round is not None and self.server_round != server_round:
            return f"the {kind} messages on record are round {self.server_round}'s, not round {server_round}'s"
        sent = self.by_node.get(node)
        if sent is None:
            return f"reply from a node that was sent no {kind} message in round {server_round}"
        expected = sent.metadata.message_id
        if not expected:
            return f"its {kind} message of round {server_round} was never pushed (it has no message id)"
        answered = reply.metadata.reply_to_message_id
        if answered != expected:
            other = next((n for n, m in self.by_node.items() if m.metadata.message_id == answered), None)
            what = (
                f"the {kind} message sent to node {other}"
                if other is not None
                else f"message {answered!r}, which is no {kind} message of round {server_round} (another round's?)"
            )
            return f"answers {what}, not the {kind} message {expected!r} sent to it in round {server_round}"
        stated = stated_round(reply)
        if stated is not None and stated != server_round:
            return f"the reply says {SERVER_ROUND} {stated!r}, this is round {server_round}"
        return None


def stated_round(reply: Message) -> object | None:
    """The ``server-round`` a reply states in a ``config`` record, if it states one (fedlayer's clients do not)."""
    if reply.has_error():
        return None
    record = reply.content.config_records.get(CONFIG)
    return record.get(SERVER_ROUND) if isinstance(record, ConfigRecord) else None
