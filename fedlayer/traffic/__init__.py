"""Measuring what crosses the wire: serialised message sizes and the byte ledger."""

from fedlayer.traffic.ledger import ByteLedger, RoundTraffic
from fedlayer.traffic.size import PAYLOAD_RECORDS, array_bytes_by_key, message_bytes, payload_bytes

__all__ = [
    "PAYLOAD_RECORDS",
    "ByteLedger",
    "RoundTraffic",
    "array_bytes_by_key",
    "message_bytes",
    "payload_bytes",
]
