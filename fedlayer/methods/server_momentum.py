"""Server momentum, an option of every method with a global model (as Flower's FedAvgM extends FedAvg).

FedAvgM (Hsu et al. 2019, https://arxiv.org/abs/1909.06335) with server
learning rate 1: for every parameter tensor a round releases (the new values
``avg`` that ``aggregate`` returns, after the configured rule and central DP),

    v <- beta v + (avg - W),    W <- W + v.

A tensor's first update is its plain new value (v starts at 0, so v = avg - W).
A tensor the round did not release keeps its value and its velocity.
BatchNorm statistics, integer tensors and tensors outside the global model
take the new value as it is: they are estimates and counters, not parameters
moved by a gradient. ``beta = 0`` is the plain update, bit for bit (the strategy
then keeps no ``ServerMomentum`` at all).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedlayer.layers import State, copy_state

#: Last name of a module buffer's state-dict key: BatchNorm statistics, not trained parameters.
BUFFER_NAMES = frozenset({"running_mean", "running_var", "num_batches_tracked"})


def parameter_keys(state: Mapping[str, np.ndarray]) -> frozenset[str]:
    """The keys of ``state`` that are trained parameters: float tensors other than module buffers."""
    return frozenset(
        key for key, value in state.items()
        if np.issubdtype(value.dtype, np.floating) and key.rsplit(".", 1)[-1] not in BUFFER_NAMES
    )


class ServerMomentum:
    """The velocity per parameter tensor and the momentum step (see the module docstring).

    ``apply`` changes the velocity; a strategy whose round is then dropped
    restores it from its snapshot (``state_dict``), like the rest of its state.
    """

    def __init__(self, beta: float, keys: frozenset[str]) -> None:
        self.beta = float(beta)
        #: the tensors momentum moves
        self.keys = keys
        #: key -> velocity (absent until a round updates the key)
        self.velocity: State = {}

    def apply(self, current: Mapping[str, np.ndarray], update: State) -> State:
        """``update`` (new values for some keys of ``current``) with momentum on its parameter tensors."""
        moved = dict(update)
        for key in (k for k in update if k in self.keys):
            now = current[key]
            step = np.asarray(update[key], dtype=now.dtype) - now
            old = self.velocity.get(key)
            if old is None:  # a key's first update: the plain average (v = avg - W)
                self.velocity[key] = step
                continue
            self.velocity[key] = (self.beta * old + step).astype(now.dtype)
            moved[key] = now + self.velocity[key]
        return moved

    def state_dict(self) -> dict[str, Any]:
        """The velocity (copied)."""
        return {"velocity": copy_state(self.velocity)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict`` output."""
        self.velocity = copy_state(state["velocity"])
