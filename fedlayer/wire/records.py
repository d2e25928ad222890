"""Names both sides of a fedlayer message agree on: records, config keys, metrics.

Method-specific keys (``laq-*``, ``fll-*``, ``fedlp-*``) live with their
method, whose server and client halves share one module.
"""

from __future__ import annotations

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
#: Records that carry model payload (dense layers, compressed updates), as
#: opposed to config and metrics: what the byte ledger attributes to layers.
PAYLOAD_RECORDS = (ARRAYS, PAYLOAD, CODEC_REFERENCE)

#: Keys of the ``config`` record of every train/evaluate message.
SERVER_ROUND = "server-round"
METHOD = "method"
REQUEST = "request"
KEEP_MODEL = "keep-model"
#: The client id the server assigned to a node without a ``partition-id`` (only such nodes are told).
CLIENT_ID = "client-id"
#: Codec stage: the reference version a download is encoded against (also the
#: version a train reply says it now holds), a dense resync, the uplink's bits.
CODEC_VERSION = "codec-version"
CODEC_RESYNC = "codec-resync"
CODEC_UP_BITS = "codec-up-bits"
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
