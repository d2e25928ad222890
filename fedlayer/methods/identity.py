"""Who may be which client: the range of server-assigned ids, and client ids bound to node keys.

Client ids come from two ranges that never meet: a node's own ``partition-id``
(below ``ASSIGNED_BASE``) and the ids the server assigns to nodes without one
(``ASSIGNED_BASE`` and up), so a device with its own data never takes a
partition's id and locks that partition out. Methods with a slot per client
(``client_limit`` slots: pFedLA's hypernetwork columns, LAQ's clients) give a
device ``ASSIGNED_BASE + slot`` and use ``slot_of``; devices take free slots
from the top down, so they meet partitions 0, 1, ... only when every slot is used.

Binding (``identity.bind``, docs/deployment.md "Who is which client"): when it
is on, the first node to claim a client id binds the id to its key, the public
key the SuperLink registered for the node (SuperNode authentication). Another
key's claim of a bound id is refused, a key is bound to one client id only, a
node that asks for an assigned id gets the one its key holds, and the operator
releases a binding with ``identity.release``. A node that restarts or
registers again with the same key keeps its client id whatever node id it
gets. Bindings and assigned ids are checkpointed with the strategy.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fedlayer.methods.replies import ReplyRejected
from fedlayer.wire.records import ASSIGNED_BASE


def slot_of(client: int) -> int:
    """The per-client slot of a client id: a partition id is its own slot, ``ASSIGNED_BASE + s`` is slot ``s``."""
    return client - ASSIGNED_BASE if client >= ASSIGNED_BASE else client


def free_client_id(node: int, taken: set[int], live: set[int], reserved: set[int], limit: int | None) -> int:
    """A new assigned client id for ``node``; ``ReplyRejected`` when every slot is in use.

    ``taken``: ids held, assigned or bound in this run; ``live``: ids held by
    connected nodes; ``reserved``: ids that must not move (bound to a key).
    Without slots: the next id never handed out. With ``limit`` slots: the
    highest slot neither a partition nor a device has used, else the highest
    slot whose device left without a binding (it takes that device's id).
    """
    if limit is None:
        return next(ASSIGNED_BASE + k for k in range(len(taken) + 1) if ASSIGNED_BASE + k not in taken)
    for s in reversed(range(limit)):
        if s not in taken and ASSIGNED_BASE + s not in taken:
            return ASSIGNED_BASE + s
    for s in reversed(range(limit)):
        device = ASSIGNED_BASE + s
        if s not in taken and device not in live and device not in reserved:
            return device
    raise ReplyRejected(node, f"no free client id: all {limit} client slots are in use")


def check_slot(node: int, client: int, taken: set[int], limit: int | None) -> None:
    """Methods with ``limit`` slots: ``ReplyRejected`` when the other client id of ``client``'s slot
    (partition ``s`` or device ``ASSIGNED_BASE + s``) is ``taken`` already."""
    if limit is None:
        return
    other = client - ASSIGNED_BASE if client >= ASSIGNED_BASE else client + ASSIGNED_BASE
    if other in taken:
        raise ReplyRejected(node, f"client slot {slot_of(client)} is used by client id {other}: all slots in use (raise federation.num_clients)")


class ClientBindings:
    """Client id -> the key of the node that first claimed it (nothing kept when ``enabled`` is off)."""

    def __init__(self, enabled: bool = False) -> None:
        self.enabled = enabled
        self.keys: dict[int, str] = {}

    def client_of_key(self, key: str | None) -> int | None:
        """The client id bound to ``key``, if any."""
        return next((client for client, bound in self.keys.items() if bound == key), None) if key else None

    def check(self, node: int, client: int, key: str | None) -> None:
        """``ReplyRejected`` unless ``node`` (with ``key``) may be ``client``."""
        if not self.enabled:
            return
        if not key:
            raise ReplyRejected(node, "the SuperLink gives no public key for this node; identity.bind=key needs SuperNode authentication")
        bound = self.keys.get(client)
        if bound is not None and bound != key:
            raise ReplyRejected(node, f"client id {client} is bound to another node's key (the operator releases it with identity.release=[{client}])")
        other = self.client_of_key(key)
        if other is not None and other != client:
            raise ReplyRejected(node, f"this node's key is bound to client id {other}, not {client}")

    def bind(self, client: int, key: str | None) -> None:
        """Bind ``client`` to ``key`` (after ``check`` passed)."""
        if self.enabled and key:
            self.keys[client] = key

    def release(self, clients: Iterable[int]) -> list[int]:
        """Drop the bindings of ``clients``; the ones that were bound."""
        return [client for client in clients if self.keys.pop(client, None) is not None]

    def state_dict(self) -> dict[str, Any]:
        return {str(client): key for client, key in sorted(self.keys.items())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.keys = {int(client): str(key) for client, key in state.items()}
