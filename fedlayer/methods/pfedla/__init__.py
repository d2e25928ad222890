"""pFedLA: the strategy, its per-client hypernetworks and its on-disk client model store."""

from fedlayer.methods.pfedla.strategy import PFedLAStrategy

__all__ = ["PFedLAStrategy"]
