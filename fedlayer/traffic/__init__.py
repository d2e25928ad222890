"""Measuring what crosses the wire: serialised message sizes and the byte ledger."""

from fedlayer.traffic.ledger import ByteLedger, RoundTraffic
from fedlayer.traffic.size import (
    MessageSize,
    measure_message,
    message_bytes,
    payload_bytes,
)

__all__ = ["ByteLedger", "MessageSize", "RoundTraffic", "measure_message", "message_bytes", "payload_bytes"]
