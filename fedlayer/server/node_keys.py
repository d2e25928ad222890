"""What the SuperLink vouches for about a node: the key ``identity.bind=key`` binds client ids to.

Flower 1.39's ``Grid.get_nodes()`` gives the ServerApp the SuperLink's
``NodeInfo`` of every connected node, with the ``public_key`` it holds for it.
Under SuperNode authentication (``flower-superlink --enable-supernode-auth``,
which ``fedlayer-server`` turns on) that is the key the operator registered
(``flwr supernode register``), and every Fleet call of the node is signed
with it: the node id is only a handle for that key, stable while the key stays
registered (also across SuperLink restarts with ``--database``), new when the
key is registered again. Without authentication a SuperNode generates a fresh
key each time it starts, and in simulation the keys are random per run, so
they identify nothing across restarts: there ``identity.bind`` is ``none``.
"""

from __future__ import annotations

import hashlib
import os

from flwr.serverapp import Grid

#: Set to 1 by ``fedlayer-server`` when it starts the SuperLink with SuperNode authentication.
NODE_AUTH_ENV = "FEDLAYER_NODE_AUTH"


def binds_keys(setting: str) -> bool:
    """Whether client ids are bound to node keys: ``identity.bind`` ``key``, ``none``, or
    ``auto`` (``key`` when ``FEDLAYER_NODE_AUTH=1`` in the ServerApp's environment)."""
    if setting == "auto":
        return os.environ.get(NODE_AUTH_ENV) == "1"
    return setting == "key"


def node_keys(grid: Grid) -> dict[int, str]:
    """Node id -> ``sha256:<hex>`` of the public key the SuperLink holds for it (nodes without one left out)."""
    return {
        int(info.node_id): "sha256:" + hashlib.sha256(info.public_key).hexdigest()
        for info in grid.get_nodes()
        if info.public_key
    }
