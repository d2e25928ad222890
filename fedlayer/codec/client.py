"""The client's half of the codec stage: decode what arrived, encode what goes back.

Method handlers never see it: ``open_download`` turns a message's encoded
layers into dense ones (rebuilt against the reference this node keeps in
``context.state``), and ``close_upload`` encodes the reply's layers against
the same reference, with error feedback (``codec-residual``: what the
quantiser dropped last time is added to the next difference, clipped to a
multiple of it: ``tensors.RESIDUAL_CLIP``), and only then
commits the new reference, residual and version, so a failed call changes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict

from fedlayer.wire.levers import Encoding
from fedlayer.wire.tensors import decode_state, encode_state
from fedlayer.layers import State, from_arrayrecord, to_arrayrecord
from fedlayer.wire.records import (
    ARRAYS,
    CODEC_LEVERS,
    CODEC_REFERENCE,
    CODEC_RESYNC,
    CODEC_SECONDS,
    CODEC_UP_BITS,
    CODEC_VERSION,
    CONFIG,
    METRICS,
)

#: ``context.state`` records of the codec.
REFERENCE = "codec-reference"
RESIDUAL = "codec-residual"
MEMORY = "codec"


class CodecMismatch(RuntimeError):
    """The node does not hold the reference the server encoded against (it lost its state)."""


@dataclass
class CodecSession:
    """One message's codec state on the client: the reference after this download, and so on."""

    reference: State
    residual: State
    version: int
    up_bits: int | None
    train: bool
    #: the uplink's levers (None: the plain ``up_bits`` format)
    levers: str | None = None
    #: seconds spent decoding this download (the reply adds its encoding: ``CODEC_SECONDS``)
    seconds: float = 0.0

    def encoding(self) -> int | Encoding:
        """How the reply is encoded: ``up_bits``, with the levers the server named."""
        assert self.up_bits is not None
        return self.up_bits if self.levers is None else Encoding.from_levers(self.up_bits, self.levers)


def _stored(context: Context, name: str) -> State | None:
    record = context.state.array_records.get(name)
    return from_arrayrecord(record) if isinstance(record, ArrayRecord) else None


def held_version(context: Context) -> int:
    """The reference version this node holds (0: the initial model)."""
    memory = context.state.config_records.get(MEMORY)
    return int(memory["version"]) if isinstance(memory, ConfigRecord) else 0


def open_download(
    content: RecordDict, context: Context, initial: Callable[[], State], train: bool
) -> tuple[RecordDict, CodecSession | None]:
    """The message content with dense layers, and the session (None when the codec is off)."""
    config = content[CONFIG]
    if CODEC_VERSION not in config:
        return content, None
    expected = int(config[CODEC_VERSION])
    if train and bool(config.get(CODEC_RESYNC, False)):
        reference, residual = from_arrayrecord(content[CODEC_REFERENCE]), {}
    else:
        held = held_version(context)
        if held != expected:
            raise CodecMismatch(
                f"this node holds codec reference version {held}, the server encoded against {expected} "
                "(state lost?); the server sends a dense resync next time"
            )
        reference = _stored(context, REFERENCE) or initial()
        residual = _stored(context, RESIDUAL) or {}
    started = time.perf_counter()
    received = decode_state(content[ARRAYS], reference) if ARRAYS in content else {}
    seconds = time.perf_counter() - started
    dense = RecordDict({name: record for name, record in content.items() if name not in (ARRAYS, CODEC_REFERENCE)})
    if received:
        dense[ARRAYS] = to_arrayrecord(received)
    up_bits = int(config[CODEC_UP_BITS]) if CODEC_UP_BITS in config else None
    levers = str(config[CODEC_LEVERS]) if CODEC_LEVERS in config else None
    if train:
        return dense, CodecSession({**reference, **received}, residual, expected + 1, up_bits, True, levers, seconds)
    return dense, CodecSession(reference, residual, held_version(context), up_bits, False, levers, seconds)


def close_upload(reply: RecordDict, session: CodecSession | None, context: Context) -> RecordDict:
    """The reply with its layers encoded (if the uplink is), its version stated; the session committed."""
    if session is None or not session.train:
        return reply
    residual = dict(session.residual)
    started = time.perf_counter()
    if session.up_bits is not None and ARRAYS in reply:
        record, _, new_residual = encode_state(from_arrayrecord(reply[ARRAYS]), session.reference, session.encoding(), residual)
        reply[ARRAYS] = record
        residual.update(new_residual)
    seconds = session.seconds + time.perf_counter() - started
    metrics = reply.metric_records.get(METRICS)
    values = dict(metrics.items()) if isinstance(metrics, MetricRecord) else {}
    reply[METRICS] = MetricRecord({**values, CODEC_VERSION: session.version, CODEC_SECONDS: seconds})
    context.state[REFERENCE] = to_arrayrecord(session.reference)
    context.state[RESIDUAL] = to_arrayrecord(residual)
    context.state[MEMORY] = ConfigRecord({"version": session.version})
    return reply
