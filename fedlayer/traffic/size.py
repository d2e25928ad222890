"""Serialised sizes of Flower messages, computed from Flower's object format.

Flower 1.39 ships a message as content-addressed objects (the Message, its
RecordDict, each record, each Array and its ArrayChunks), one RPC each. The
bytes on the wire for a message are therefore the serialised sizes of all its
distinct nested objects; this is what the SuperLink stores and forwards, so it
is what fedlayer counts (never the raw array sizes).

The sizes are computed, not serialised: serialising copies every array twice
and SHA-256 hashes it for the object ids, about a tenth of a second of server
time a round for the CNN in simulation (where Flower itself never serialises),
and as much again on the clients. Flower's format fixes every size: an object
is a head ``<class> <child ids, comma-joined> <body length>``, a zero byte and
its body, and an object id is always 64 hex digits. Bodies: an ArrayChunk's
bytes; an Array's JSON of dtype, shape, stype and chunk indices; an
ArrayRecord's or RecordDict's JSON of name -> child id; a Message's metadata
protobuf; a ConfigRecord's or MetricRecord's protobuf (these small ones are
serialised for real). Equal objects are stored once (equal content, equal
id): equality is decided by comparing contents, never by hashing. The tests
check every record kind against Flower's own serialisation
(``tests/test_message_size.py``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE
from flwr.common.serde_utils import error_to_proto, metadata_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=E0611
from flwr.supercore.constant import HEAD_BODY_DIVIDER, HEAD_VALUE_DIVIDER
from flwr.supercore.inflatable.inflatable_object import InflatableObject

from fedlayer.layers import to_arrayrecord
from fedlayer.wire.records import PAYLOAD_RECORDS

#: Hex digits of an object id (SHA-256)
ID_LENGTH = 64
_SOME_ID = "0" * ID_LENGTH
#: Chunk bytes compared at a time when two chunks may be equal (a mismatch stops early)
_COMPARE_BLOCK = 1 << 16
#: Positions sampled per chunk to tell most unequal chunks apart without comparing them
_SAMPLES = 16


@dataclass
class MessageSize:
    """A message's bytes: in all, in its payload records, and per array key of those."""

    total: int
    payload: int = 0
    by_key: dict[str, int] = field(default_factory=dict)


def object_size(class_name: str, children: int, body: int) -> int:
    """Serialised bytes of an object of ``class_name`` with ``children`` distinct child ids and a ``body``-byte body."""
    ids = children * (ID_LENGTH + 1) - 1 if children else 0
    head = len(class_name.encode()) + 2 * len(HEAD_VALUE_DIVIDER) + ids + len(str(body))
    return head + len(HEAD_BODY_DIVIDER) + body


def _same_bytes(a: memoryview, b: memoryview) -> bool:
    """Whether two byte buffers are equal, block by block (a difference ends it early)."""
    if len(a) != len(b):
        return False
    return all(a[i : i + _COMPARE_BLOCK].tobytes() == b[i : i + _COMPARE_BLOCK].tobytes() for i in range(0, len(a), _COMPARE_BLOCK))


class _Objects:
    """The distinct objects of message trees and their serialised sizes.

    Each distinct object gets a token (an int): two objects get the same
    token exactly when Flower gives them the same id, i.e. when their
    serialised contents are equal. A parent's content names its children by
    id, so it is compared by its children's tokens.
    """

    def __init__(self) -> None:
        self.size: dict[int, int] = {}
        self._tokens: dict[Any, int] = {}
        #: (length, sampled bytes) -> [(chunk bytes, token)]: chunks that may be equal
        self._chunks: dict[tuple[int, bytes], list[tuple[memoryview, int]]] = {}
        #: id(object) -> (object, its token, its subtree's tokens); the object is kept so the id stays unique
        self._seen: dict[int, tuple[object, int, frozenset[int]]] = {}

    def _token(self, content: Any, size: int) -> int:
        token = self._tokens.setdefault(content, len(self._tokens))
        self.size[token] = size
        return token

    def _chunk(self, data: memoryview) -> int:
        """The token of an ArrayChunk of ``data``."""
        n = len(data)
        sample = b"".join(data[i : i + 8].tobytes() for i in range(0, n, max(1, n // _SAMPLES))) + data[-8:].tobytes()
        candidates = self._chunks.setdefault((n, sample), [])
        for other, token in candidates:
            if _same_bytes(data, other):
                return token
        token = self._token(("ArrayChunk", len(self._tokens)), object_size("ArrayChunk", 0, n))  # a content not seen before
        candidates.append((data, token))
        return token

    def tree(self, obj: InflatableObject) -> frozenset[int]:
        """Tokens of ``obj`` and all its descendants."""
        return self._visit(obj)[1]

    def total(self, tokens: frozenset[int]) -> int:
        return sum(self.size[t] for t in tokens)

    def _visit(self, obj: InflatableObject) -> tuple[int, frozenset[int]]:
        seen = self._seen.get(id(obj))
        if seen is None:
            seen = self._seen[id(obj)] = (obj, *self._measure(obj))
        return seen[1], seen[2]

    def _parent(self, class_name: str, children: list[tuple[str, InflatableObject]], body: bytes) -> tuple[int, frozenset[int]]:
        """An object whose body is ``body`` and whose children are ``(name, child)`` pairs."""
        visited = [(name, *self._visit(child)) for name, child in children]
        distinct = list(dict.fromkeys(token for _, token, _ in visited))
        size = object_size(class_name, len(distinct), len(body))
        token = self._token((class_name, tuple((name, token) for name, token, _ in visited), body), size)
        return token, frozenset({token}).union(*(tokens for _, _, tokens in visited))

    def _measure(self, obj: InflatableObject) -> tuple[int, frozenset[int]]:
        if isinstance(obj, Message):
            metadata = metadata_to_proto(obj.metadata)
            metadata.message_id = ""  # as Message.deflate: the id is not part of the content
            error = error_to_proto(obj.error) if obj.has_error() else None
            body = ProtoMessage(metadata=metadata, content=None, error=error).SerializeToString(deterministic=True)
            return self._parent("Message", [("", obj.content)] if obj.has_content() else [], body)
        if isinstance(obj, (RecordDict, ArrayRecord)):
            body = json.dumps(dict.fromkeys(obj, _SOME_ID)).encode("utf-8")  # name -> child id
            return self._parent(type(obj).__qualname__, list(obj.items()), body)
        if isinstance(obj, Array):
            return self._array(obj)
        if isinstance(obj, (ConfigRecord, MetricRecord)):  # no children: serialising is cheap and exact
            content = obj.deflate()
            token = self._token(content, len(content))
            return token, frozenset({token})
        raise TypeError(f"cannot size a {type(obj).__qualname__}: not one of Flower 1.39's message objects")

    def _array(self, array: Array) -> tuple[int, frozenset[int]]:
        """As ``Array.deflate``: chunks of at most Flower's chunk size; the body lists each chunk's index among the distinct ones."""
        data = memoryview(array.data)
        step = FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE
        chunks = [self._chunk(data[start : start + step]) for start in range(0, len(data), step)]
        distinct = list(dict.fromkeys(chunks))
        index = {token: i for i, token in enumerate(distinct)}
        metadata = {"dtype": array.dtype, "shape": array.shape, "stype": array.stype, "arraychunk_ids": [index[t] for t in chunks]}
        body = json.dumps(metadata).encode("utf-8")
        token = self._token(("Array", tuple(distinct), body), object_size("Array", len(distinct), len(body)))
        return token, frozenset({token, *distinct})


def measure_message(message: Message) -> MessageSize:
    """Total, payload and per-array bytes of a message.

    Payload: the records named in ``PAYLOAD_RECORDS`` (each counted over its
    own distinct objects); per key: each array of an ArrayRecord payload.
    """
    objects = _Objects()
    payload, by_key = 0, {}
    if not message.has_error():
        for name in PAYLOAD_RECORDS:
            if name not in message.content:
                continue
            record = message.content[name]
            if isinstance(record, ArrayRecord):
                for key, array in record.items():
                    by_key[key] = objects.total(objects.tree(array))
            payload += objects.total(objects.tree(record))
    return MessageSize(total=objects.total(objects.tree(message)), payload=payload, by_key=by_key)


def object_tree_bytes(obj: InflatableObject) -> int:
    """Serialised size of an object and all its distinct descendants."""
    objects = _Objects()
    return objects.total(objects.tree(obj))


def message_bytes(message: Message) -> int:
    """Bytes a message occupies on the wire (all distinct nested objects)."""
    return object_tree_bytes(message)


def payload_bytes(message: Message) -> int:
    """Bytes of the model payload records of a message (see ``PAYLOAD_RECORDS``)."""
    return measure_message(message).payload


def trained_model_bytes(state: dict[str, np.ndarray]) -> int:
    """Serialised size of an ArrayRecord of ``state`` once its float tensors are trained.

    Flower stores equal objects once (arrays, their chunks, and the record's
    references to them), and an initial model often holds equal arrays
    (BatchNorm's zero means and unit variances) that training makes distinct,
    while integer counters (``num_batches_tracked``) stay equal. So the size of
    a FedAvg client's upload, the unit of the FedAvg equivalent, is that of
    the state with its float tensors replaced by random values of the same
    shape and dtype (the serialised size does not depend on the values).
    """
    rng = np.random.default_rng(0)
    trained = {
        key: rng.standard_normal(value.shape).astype(value.dtype) if value.dtype.kind == "f" else value
        for key, value in state.items()
    }
    return object_tree_bytes(to_arrayrecord(trained))
