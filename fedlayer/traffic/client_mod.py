"""Client mod that measures the serialised size of each message in and out."""

from __future__ import annotations

from flwr.app import Context, Message, MetricRecord
from flwr.clientapp.typing import ClientAppCallable

from fedlayer.wire.records import TRAFFIC
from fedlayer.traffic.size import message_bytes


def traffic_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Measure the received message and the reply, and report both in the reply.

    The sizes go into a ``traffic`` MetricRecord of the reply (``bytes-received``,
    ``bytes-sent``). ``bytes-sent`` is measured before that record is added, so
    it under-counts the reply by the record's own ~100 bytes.
    """
    received = message_bytes(message)
    reply = call_next(message, context)
    if reply.has_error():
        return reply
    sent = message_bytes(reply)
    reply.content[TRAFFIC] = MetricRecord({"bytes-received": received, "bytes-sent": sent})
    return reply
