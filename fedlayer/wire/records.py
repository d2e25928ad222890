"""Names both sides of a fedlayer message agree on: records, config keys, metrics.

Method-specific keys (``laq-*``, ``fll-*``, ``fedlp-*``) live with their
method, whose server and client halves share one module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fedlayer.wire.messages import MessageError, wire

#: Records of a message's RecordDict.
CONFIG = "config"
ARRAYS = "arrays"
PAYLOAD = "payload"
METRICS = "metrics"
TRAFFIC = "traffic"
#: Where a train reply was computed: hostname (and Ray node id in simulation).
HOST = "host"
#: A dense resync's whole reference (codec stage; see ``fedlayer.codec``).
CODEC_REFERENCE = "codec-reference"
#: Tensors a method encodes itself in the quantised-tensor format (``tensors.py``),
#: one Array per tensor key: LAQ's innovations.
CODED = "coded"
#: Records that carry model payload (dense layers, coded tensors), as
#: opposed to config and metrics: what the byte ledger attributes to layers.
PAYLOAD_RECORDS = (ARRAYS, PAYLOAD, CODEC_REFERENCE, CODED)

#: Keys of the ``config`` record of every train/evaluate message.
SERVER_ROUND = "server-round"
METHOD = "method"
REQUEST = "request"
KEEP_MODEL = "keep-model"
#: The client id the server assigned to a node without a ``partition-id`` (only such nodes are told).
CLIENT_ID = "client-id"
#: The fedlayer run a message belongs to (``RunDirectory.run_key``): what a node keys its saved round
#: state by. Unlike Flower's run id it stays the same when ``resume=`` continues the run.
RUN_KEY = "run-key"
#: A run key: 16 lower-case hex digits.
RUN_KEY_PATTERN = "[0-9a-f]{16}"
#: Codec stage: the reference version a download is encoded against (also the
#: version a train reply says it now holds), a dense resync, the uplink's bits.
CODEC_VERSION = "codec-version"
CODEC_RESYNC = "codec-resync"
CODEC_UP_BITS = "codec-up-bits"
#: Codec levers of the uplink (``fedlayer.wire.levers.Encoding.levers``; only when one is on), and the
#: seconds a client spent decoding and encoding for a train reply (only with the codec on).
CODEC_LEVERS = "codec-levers"
CODEC_SECONDS = "codec-seconds"
#: Key of the identity query's ``config`` record.
QUERY = "query"
#: Adaptive clipping (``fedlayer.privacy``): the clip a train message asks for, and whether the
#: reply's update was within it (1.0) or not (0.0); the server only uses the noised count.
DP_CLIP = "dp-clip"
DP_WITHIN_CLIP = "dp-within-clip"

#: Metrics every train reply carries.
NUM_EXAMPLES = "num-examples"
PARTITION_ID = "partition-id"
#: A train reply's local training time in seconds (per-client health; not averaged into the run's metrics).
TRAIN_SECONDS = "train-seconds"
#: The identity answer of a node whose node config has no ``partition-id``.
NO_PARTITION = -1
#: The first client id the server assigns (to nodes without a ``partition-id``);
#: partition ids lie below it, so the two never meet.
ASSIGNED_BASE = 1_000_000


@dataclass(frozen=True)
class RoundConfig:
    """Down, in every train and evaluate message (``LayerwiseStrategy.build_messages``; see ``wire.messages``).

    The method's own message (its plan's config) and the codec stage's keys
    travel in the same ``config`` record.
    """

    server_round: int = wire(SERVER_ROUND)
    method: str = wire(METHOD)
    #: layer names to return (``[""]``: none; a ConfigRecord holds no empty list)
    request: list[str] = wire(REQUEST, ())
    #: whether the node keeps its model for its next round
    keep_model: bool = wire(KEEP_MODEL, True)
    #: the client id the server assigned a node without a ``partition-id`` (only such nodes are told)
    client_id: int | None = wire(CLIENT_ID, None)
    #: adaptive clipping: the clip a train message asks for
    dp_clip: float | None = wire(DP_CLIP, None)
    #: the fedlayer run (``RUN_KEY``); None: the message uses no saved round state
    run_key: str | None = wire(RUN_KEY, None)

    def check(self) -> None:
        """A run key names a folder on the node: only the server's own form (no path) is accepted."""
        if self.run_key is not None and re.fullmatch(RUN_KEY_PATTERN, self.run_key) is None:
            raise MessageError(f"{RUN_KEY!r} must be {RUN_KEY_PATTERN}, got {self.run_key!r}")
