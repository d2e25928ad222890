"""fedlayer's methods: each module holds a method's strategy and its client handlers.

``METHODS`` maps the configured ``strategy.name`` (also the ``method`` every
message names) to both halves; the server builds the strategy, the ClientApp
looks up the handlers.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedlayer.methods.base import LayerwiseStrategy, NodePlan
from fedlayer.methods.client_half import ClientHandler, standard_evaluate, standard_train
from fedlayer.methods.fedavg import FedAvgStrategy
from fedlayer.methods.fedlama import FedLAMAStrategy, fedlama_train
from fedlayer.methods.fedlp import FedLPStrategy, fedlp_train
from fedlayer.methods.fll import FLLStrategy, fll_evaluate, fll_train
from fedlayer.methods.laq import LAQStrategy, laq_train
from fedlayer.methods.local import LocalOnlyStrategy
from fedlayer.methods.pfedla import PFedLAStrategy


@dataclass(frozen=True)
class Method:
    """Both halves of a method."""

    strategy: type[LayerwiseStrategy]
    train: ClientHandler = standard_train
    evaluate: ClientHandler = standard_evaluate


METHODS: dict[str, Method] = {
    "fedavg": Method(FedAvgStrategy),
    "fedlama": Method(FedLAMAStrategy, train=fedlama_train),
    "fedlp": Method(FedLPStrategy, train=fedlp_train),
    "fll": Method(FLLStrategy, train=fll_train, evaluate=fll_evaluate),
    "laq": Method(LAQStrategy, train=laq_train),
    "local": Method(LocalOnlyStrategy),
    "pfedla": Method(PFedLAStrategy),
}

__all__ = ["METHODS", "LayerwiseStrategy", "Method", "NodePlan"]
