"""The server's half of the codec stage: per-client references, versions and resyncs.

Down: a layer goes to client ``c`` as the difference from ``c``'s reference
(the values ``c`` last received of each layer; the initial model before
that), and both ends replace the reference with what ``c`` rebuilds. Up: a
reply's layers are differences from that same reference, decoded here before
validation; error feedback lives with the client (the sender).

Every train download carries the version of the reference it is encoded
against; the client refuses one it does not hold (it lost its state). The
server then sends that client a **dense resync** next time: the whole
reference, dense, in ``CODEC_REFERENCE``, counted by the ledger. A client
holds the new version only once it replied (``receive``); the server takes
it on only with the round that accepts the reply (``commit``). A download that
was never answered is forgotten, so both ends stay at the old version.
Federated-evaluation downloads are encoded against the reference and change nothing.

**Download errors stay out of the model.** A client trains from what it
rebuilt, ``r + Q(x - r)``, not from the ``x`` the server meant to send; the
methods aggregate the models clients return, so without care each download's
error would enter the global model, where nothing ever corrects it (the next
download is the difference from that model): the global model random-walks
with the download noise, and with the LAQ grid at 2 bits, whose step follows
a tensor's largest value, FedLAMA and FedLP diverged. So the server keeps,
per client, what each coded train download meant the client to hold
(``meant``, beside the reference: what it does hold), and each layer of a
reply becomes ``meant + (y - r')``: the client's own update ``y - r'``
(against what it holds) applied to what the server meant. Under a layer
schedule a layer comes back rounds after it went down (FedLAMA's long
intervals), so ``meant`` lasts until the layer's next download; a dense
resync clears it (the client then holds exactly what was meant). The
download's error stays only where it is owed: in the difference the next
download to that client carries.

The levers (``CodecOptions``: 1-bit block scales, top-k, zstd, bit budgets;
``fedlayer.wire.levers``) travel to the client in ``CODEC_LEVERS`` and every
reply is checked against them. With ``shared_downlink`` a download is encoded
once per (reference, state) in a round and the same record goes to every
client holding that reference. The seconds spent encoding and decoding here,
and those the clients report (``CODEC_SECONDS``), are the round's
``codec`` record.
"""

from __future__ import annotations

import hashlib
import math
import time
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message

from fedlayer.codec.options import CodecOptions
from fedlayer.server_client_state import ClientStates
from fedlayer.wire.tensors import (
    CodecError,
    check_encoding,
    decode_state,
    encode_state,
)
from fedlayer.layers import State, copy_state, to_arrayrecord
from fedlayer.wire.records import (
    ARRAYS,
    CODEC_LEVERS,
    CODEC_REFERENCE,
    CODEC_RESYNC,
    CODEC_SECONDS,
    CODEC_UP_BITS,
    CODEC_VERSION,
    METRICS,
)

#: The error a client answers with when it does not hold the version a download names.
MISMATCH = "CodecMismatch"


class ServerCodec:
    """References and versions per client id; encodes downloads, decodes uploads."""

    def __init__(
        self, initial_state: State, up_bits: int, down_bits: int, budget_bytes: int | None = None,
        options: CodecOptions | None = None,
    ) -> None:
        self.initial = copy_state(initial_state)
        self.up_bits = up_bits
        self.down_bits = down_bits
        self.options = options or CodecOptions()
        self.options.check(up_bits, down_bits)
        self.up = self.options.encoding(up_bits)
        self.down = self.options.encoding(down_bits, down=True)
        #: this round's downloads by (reference digest, state digest), under ``shared_downlink``
        self.shared: dict[tuple[str, str], tuple[ArrayRecord, State]] = {}
        #: client -> (version, digest) of its reference, so a digest is taken once per reference
        self.digests: dict[int, tuple[int, str]] = {}
        #: this round's seconds encoding and decoding here, and the accepted clients' own (``CODEC_SECONDS``)
        self.encode_seconds = 0.0
        self.decode_seconds = 0.0
        self.client_seconds: dict[int, float] = {}
        self.shared_hits = 0
        #: client -> its reference, for clients whose reference left the initial model (on disk beyond the budget)
        self.references = ClientStates("codec-references", budget_bytes)
        self.versions: dict[int, int] = {}
        #: client -> (version, reference, meant) once it answers this round's download
        self.pending: dict[int, tuple[int, State, State]] = {}
        #: client -> (version, reference, meant) its reply says it now holds, committed with the round (``commit``)
        self.received: dict[int, tuple[int, State, State]] = {}
        #: clients whose next train download is a dense resync
        self.needs_resync: set[int] = set()
        #: client -> per layer, what its coded train downloads meant it to hold (a reply's update is applied to it)
        self.meant = ClientStates("codec-meant", budget_bytes)

    @property
    def active(self) -> bool:
        return self.up.coded or self.down.coded

    def reference(self, client: int) -> State:
        return self.references.get(client) or self.initial

    def start_round(self) -> None:
        """Forget downloads of earlier rounds that were never answered."""
        self.pending = {}
        self.received = {}
        self.shared = {}
        self.encode_seconds = 0.0
        self.decode_seconds = 0.0
        self.client_seconds = {}
        self.shared_hits = 0

    def round_record(self) -> dict[str, Any]:
        """The round's codec seconds: the server's, and the mean and sum of the accepted clients' own."""
        seconds = list(self.client_seconds.values())
        return {"server_seconds": self.encode_seconds + self.decode_seconds, "encode_seconds": self.encode_seconds,
                "decode_seconds": self.decode_seconds, "client_seconds_mean": sum(seconds) / len(seconds) if seconds else 0.0,
                "client_seconds_sum": sum(seconds), "shared_downloads": self.shared_hits}

    def download(self, client: int, state: State, train: bool) -> tuple[dict[str, Any], dict[str, ArrayRecord], State]:
        """Config entries, records and the state the client's update will be measured against, for sending ``state``.

        That state is ``state`` itself: a coded download's error is kept out of
        the reply (``receive``), so the reply is ``state`` plus the client's update.
        """
        version = self.versions.get(client, 0)
        config: dict[str, Any] = {CODEC_VERSION: version}
        if self.up.coded:
            config[CODEC_UP_BITS] = self.up_bits
            if not self.up.plain:
                config[CODEC_LEVERS] = self.up.levers()
        reference = self.reference(client)
        if train and client in self.needs_resync:
            updated = {**reference, **state}
            config[CODEC_RESYNC] = True
            records = {CODEC_REFERENCE: to_arrayrecord(updated)}
            if state:
                records[ARRAYS] = to_arrayrecord(state)
            self.pending[client] = (version + 1, updated, {})  # it holds exactly what is meant
            return config, records, state
        started = time.perf_counter()
        if not self.down.coded:
            record, rebuilt = to_arrayrecord(state), state
        elif self.options.shared_downlink:
            record, rebuilt = self._shared_download(client, reference, state)
        else:
            record, rebuilt, _ = encode_state(state, reference, self.down)
        self.encode_seconds += time.perf_counter() - started
        if train:
            meant = self.meant.get(client) or {}
            self.pending[client] = (version + 1, {**reference, **rebuilt}, {**meant, **state} if self.down.coded else meant)
        return config, ({ARRAYS: record} if state else {}), state

    def _shared_download(self, client: int, reference: State, state: State) -> tuple[ArrayRecord, State]:
        """``state`` encoded against ``reference`` once per round for all clients holding that reference."""
        version = self.versions.get(client, 0)
        known = self.digests.get(client)
        if known is None or known[0] != version:
            known = (version, state_digest(reference))
            self.digests[client] = known
        key = (known[1], state_digest(state))
        if key in self.shared:
            self.shared_hits += 1
        else:
            record, rebuilt, _ = encode_state(state, reference, self.down)
            self.shared[key] = (record, rebuilt)
        return self.shared[key]

    def receive(self, client: int, reply: Message, server_round: int) -> None:
        """Settle the client's download version from its reply, and decode its layers in place.

        Raises ``CodecError`` (a ``ValueError``), leaving the codec's state as
        it was, for a reply that no download awaits, that names another
        reference version than the one this round's download leads to, that
        is encoded other than ``up_bits`` says, or whose layers do not decode.
        """
        pending = self.pending.pop(client, None)
        if reply.has_error():  # a client commits only on success: it holds the old version...
            if pending is not None and MISMATCH in str(reply.error.reason):  # ...unless it holds none the server knows
                self.needs_resync.add(client)
            return
        if pending is None:
            raise CodecError("no train download to this client awaits a reply (answered already?)")
        version, reference, meant = pending
        metrics = reply.content.metric_records.get(METRICS)
        stated = metrics.get(CODEC_VERSION) if metrics is not None else None
        if stated != version:
            raise CodecError(f"reply names reference version {stated}, the server has version {version} pending for this client")
        seconds = metrics.get(CODEC_SECONDS, 0.0) if metrics is not None else 0.0
        if not (isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds >= 0):
            raise CodecError(f"{CODEC_SECONDS} must be a finite number >= 0, got {seconds!r}")
        started = time.perf_counter()
        decoded = None
        if ARRAYS in reply.content.array_records:
            check_encoding(reply.content[ARRAYS], reference, self.up, "up_bits")
            if self.up.coded:
                decoded = decode_state(reply.content[ARRAYS], reference)
            uploaded = decoded if decoded is not None else dense_arrays(reply.content[ARRAYS]) if meant else None
            if meant and uploaded is not None:
                decoded = without_download_error(uploaded, reference, meant)
        self.decode_seconds += time.perf_counter() - started
        self.client_seconds[client] = float(seconds)
        self.received[client] = (version, reference, meant)
        if decoded is not None:
            reply.content[ARRAYS] = to_arrayrecord(decoded)

    def commit(self, clients: list[int], server_round: int) -> None:
        """The new references of ``clients``, received this round, become current.

        Called once the round is committed, for the clients whose replies it
        accepted: a refused reply or a dropped round leaves the references and
        versions as they were (a client that did commit its new version is then
        refused the next download as out of step and resynchronised).
        """
        for client in clients:
            if client in self.received:
                version, reference, meant = self.received.pop(client)
                self.references.put(client, reference, server_round)
                if meant:
                    self.meant.put(client, meant, server_round)
                elif client in self.meant:
                    self.meant.pop(client)
                self.versions[client] = version
                self.needs_resync.discard(client)

    def state_dict(self) -> dict[str, Any]:
        return {
            "references": self.references.state_dict(),
            "meant": self.meant.state_dict(),
            "versions": {str(c): v for c, v in self.versions.items()},
            "needs_resync": sorted(self.needs_resync),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.references.load_state_dict(state["references"])
        self.meant.load_state_dict(state["meant"])
        self.versions = {int(c): int(v) for c, v in state["versions"].items()}
        self.needs_resync = {int(c) for c in state["needs_resync"]}
        self.pending = {}
        self.received = {}


def without_download_error(reply: State, held: State, meant: State) -> State:
    """``reply`` with each layer a coded download carried moved from what the client held to what was meant:
    ``meant + (reply - held)``, the same float32 operations on every machine."""
    moved = dict(reply)
    for key, value in reply.items():
        meant_value, start = meant.get(key), held.get(key)
        if (meant_value is not None and start is not None and value.dtype == meant_value.dtype == np.float32
                and value.shape == meant_value.shape):
            moved[key] = np.add(meant_value, np.subtract(value, start, dtype=np.float32), dtype=np.float32)
    return moved


def dense_arrays(record: ArrayRecord) -> State | None:
    """The arrays of an uncoded upload; None if one does not decode (validation refuses the reply after)."""
    try:
        return {key: array.numpy() for key, array in record.items()}
    except Exception:  # corrupt bytes raise many kinds of errors
        return None


def state_digest(state: State) -> str:
    """A digest of ``state``'s keys, dtypes, shapes and bytes (which downloads can be shared)."""
    digest = hashlib.blake2b(digest_size=16)
    for key in sorted(state):
        value = state[key]
        digest.update(f"{key}|{value.dtype.str}|{value.shape}|".encode())
        digest.update(memoryview(value).cast("B") if value.flags.c_contiguous else value.tobytes())
    return digest.hexdigest()
