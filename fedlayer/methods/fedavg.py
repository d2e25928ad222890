"""FedAvg (McMahan et al. 2017): the baseline every saving is measured against.

The base class already is FedAvg: the whole model goes down and comes back,
and each layer is the example-weighted mean of the replies.
"""

from __future__ import annotations

from fedlayer.methods.base import LayerwiseStrategy


class FedAvgStrategy(LayerwiseStrategy):
    """Federated averaging over all layers."""

    method = "fedavg"
