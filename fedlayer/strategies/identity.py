"""Which client each node is: stable client ids for nodes whose ids are not.

Flower node ids are addresses, not identities: every simulation draws new
random ones, and a SuperNode that registers again may get a new one. Anything
the server keeps per client (FedLAMA's cohort, FedLP's depth levels, FLL's
delivered blocks, LAQ's memory, pFedLA's hypernetworks) and the seeded choice
of who trains are therefore keyed by a *client id*: the node's
``partition-id`` from its node config, learned once per node with a QUERY
message that the ClientApp answers without touching data or model. A node
whose node config has no ``partition-id`` (a device with its own data) is
keyed by its node id.

With client ids, a run resumed after a crash samples the same clients and
finds the same per-client state, although every node id has changed.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedlayer.strategies.validation import ReplyRejected

#: The metric a ClientApp answers an identity query with.
PARTITION_ID = "partition-id"
#: Its answer when the node config has no ``partition-id``.
NO_PARTITION = -1


def identity_query(method: str, node_id: int) -> Message:
    """The QUERY message asking ``node_id`` for its ``partition-id``."""
    content = RecordDict({"config": ConfigRecord({"method": method, "query": PARTITION_ID})})
    return Message(content, message_type=MessageType.QUERY, dst_node_id=node_id)


def parse_identity(
    reply: Message, client_of: dict[int, int], connected: Iterable[int], limit: int | None = None
) -> tuple[int, int]:
    """``(node id, client id)`` from a query reply; ``ReplyRejected`` if unusable.

    ``limit``: client ids must be partition ids in ``[0, limit)`` (methods
    with one slot per client); otherwise a node without one is keyed by its
    node id. A partition id held by another *connected* node is refused; one
    held by a node that is gone moves to the new node (a SuperNode that came
    back under a new node id).
    """
    node = reply.metadata.src_node_id
    if reply.has_error():
        raise ReplyRejected(node, f"identity query failed: {reply.error.reason}")
    record = reply.content.metric_records.get("metrics")
    value = record.get(PARTITION_ID) if isinstance(record, MetricRecord) else None
    if not isinstance(value, (int, float)) or value != int(value) or value < NO_PARTITION:
        raise ReplyRejected(node, f"{PARTITION_ID} must be an integer >= 0 (or {NO_PARTITION}: none), got {value!r}")
    if limit is not None and not 0 <= value < limit:
        raise ReplyRejected(node, f"{PARTITION_ID} must be an integer in [0, {limit}), got {value!r}")
    if value == NO_PARTITION:
        return node, node
    client = int(value)
    live = set(connected)
    owner = next((n for n, c in client_of.items() if c == client and n != node and n in live), None)
    if owner is not None:
        raise ReplyRejected(node, f"{PARTITION_ID} {client} already belongs to node {owner}")
    return node, client


def client_order(node_ids: Iterable[int], client_of: dict[int, int]) -> list[int]:
    """Nodes ordered by client id (unknown nodes last, by node id): the same order in every run."""
    return sorted(node_ids, key=lambda node: (node not in client_of, client_of.get(node, node), node))
