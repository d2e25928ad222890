"""One model kept between the messages of a run (a warm worker's per-run session).

A fresh ClientApp process builds its model for every message, loads the
received state into it and moves it to the device. A warm worker's session
keeps the model it built, already on the device, and hands it out again for
the next message, which loads its state into the same tensors (``copy_``).

The model handed out again equals a freshly built one in everything a
handler sees besides the values it then loads in full: every module's
train/eval mode and every parameter's ``requires_grad`` as built, no
gradients. Optimizers are never kept (each round builds its own), so
nothing of one round reaches the next. What determines the model's
structure is its ``key``: a different key builds a new model in place of the
old one, so a session holds one model at most.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import TypeVar

import torch
from torch import nn

from fedlayer.layers import State, torch_state_to_numpy

ModelT = TypeVar("ModelT", bound=nn.Module)


class KeptModel:
    """The one model of a session, with the modes and flags it was built with."""

    def __init__(self) -> None:
        self.key: tuple[Hashable, ...] | None = None
        self.model: nn.Module | None = None
        #: times a model was built (a new key, or after ``forget``)
        self.builds = 0
        self._modes: list[bool] = []
        self._requires_grad: list[bool] = []
        self._initial: State | None = None

    def take(self, key: Hashable, build: Callable[[], ModelT], device: torch.device, *, initial: bool = False) -> ModelT:
        """The kept model for ``key`` on ``device``, reset as built; else ``build()``, moved there and kept.

        With ``initial``, the state it was built with is kept too (``initial_state``).
        """
        full_key = (key, str(device))
        if (self.model is None or full_key != self.key or not self._unchanged(self.model)
                or (initial and self._initial is None)):
            self.forget()  # the old model's memory goes before the new one is allocated
            model = build()
            self._modes = [module.training for module in model.modules()]
            self._requires_grad = [param.requires_grad for param in model.parameters()]
            self._initial = _read_only(torch_state_to_numpy(model.state_dict())) if initial else None
            self.model, self.key = model.to(device), full_key
            self.builds += 1
            return model
        model = self.model
        for module, training in zip(model.modules(), self._modes, strict=True):
            module.training = training
        for param, flag in zip(model.parameters(), self._requires_grad, strict=True):
            param.grad = None
            param.requires_grad_(flag)
        return model.to(device)  # a no-op, unless a handler moved it (FLL's linear probe runs on the CPU)

    def _unchanged(self, model: nn.Module) -> bool:
        """Whether ``model`` still has the modules and parameters it was built with (a handler
        that attached or removed one would leave a model that is not as built: it is built again)."""
        return (sum(1 for _ in model.modules()) == len(self._modes)
                and sum(1 for _ in model.parameters()) == len(self._requires_grad))

    def initial_state(self) -> State:
        """The state the kept model was built with (read-only arrays)."""
        if self._initial is None:
            raise RuntimeError("no model kept with its initial state")
        return dict(self._initial)

    def load(self, model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        """Load a full ``state`` into the kept ``model``'s own tensors; a failed load drops the model,
        so a half-loaded one is never handed out again."""
        try:
            model.load_state_dict(state)
        except BaseException:
            self.forget()
            raise

    def forget(self) -> None:
        """Drop the kept model (the next ``take`` builds one)."""
        self.key, self.model, self._initial = None, None, None


def _read_only(state: State) -> State:
    for value in state.values():
        value.flags.writeable = False
    return state
