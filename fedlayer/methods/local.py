"""Local-only training: the no-federation baseline for personalised methods.

Every node trains the model it keeps in ``context.state`` (the shared initial
model in its first round) and never receives or sends layers; the server only
collects metrics. ``local-test-accuracy`` of the replies is then the accuracy
of purely local models on each client's personal test split. The global
model never changes, so the central accuracy stays that of the initial model.
"""

from __future__ import annotations

from fedlayer.layers import State
from fedlayer.methods.base import LayerwiseStrategy, NodePlan
from fedlayer.methods.replies import TrainReply


class LocalOnlyStrategy(LayerwiseStrategy):
    """Clients train alone; nothing is aggregated."""

    method = "local"
    client_keeps_model = True
    no_global_model = "clients train alone; nothing is aggregated"

    def plan(self, server_round: int, node_id: int) -> NodePlan:
        """No layers either way."""
        return NodePlan(send=[], request=[])

    def aggregate(self, server_round: int, replies: list[TrainReply]) -> State:
        """Nothing to merge."""
        return {}
