"""A strategy's checkpointed state, declared once as a dataclass; saving and loading follow from it.

Each field of a state dataclass names an attribute of the strategy (or,
with ``attr``, a dotted path to one) and says its type; ``save_state`` turns those
attributes into plain, JSON-ready values (with numpy arrays, which the
checkpoint stores natively), ``load_state`` turns them back and sets them. A field
whose type is itself a dataclass is a group: a nested dict whose fields are
again attributes of the strategy. Everything ``save_state`` returns is a copy, so a
snapshot taken before a round (``commit_or_drop``) is not changed by it.

Types: int, float, str, bool, None-able ones, ``list``/``set``/``dict`` of
them (dict keys are saved as strings), ``np.ndarray``, ``Any`` (deep-copied
as is), a numpy ``Generator`` (its bit generator's state, restored in place)
and objects with ``state_dict``/``load_state_dict`` (restored in place; one
that is None is saved as None and left alone on load).

A key absent from a loaded dict takes the field's default (state that older
checkpoints lack); a field without one must be there.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from typing import Any, Union

import numpy as np

#: The metadata entry of a field's attribute path (default: the field name).
ATTR = "attr"


def attr(path: str) -> Any:
    """A state field kept in the strategy's attribute ``path`` (dotted: ``store.versions``)."""
    return dataclasses.field(metadata={ATTR: path})


def save_state(owner: Any, schema: type) -> dict[str, Any]:
    """The attributes ``schema`` declares, read from ``owner``, as plain values."""
    hints = typing.get_type_hints(schema)
    out: dict[str, Any] = {}
    for item in dataclasses.fields(schema):
        hint = hints[item.name]
        if dataclasses.is_dataclass(hint):
            out[item.name] = save_state(owner, hint)  # type: ignore[arg-type]
        else:
            out[item.name] = to_plain(_get(owner, _path(item)), hint)
    return out


def load_state(owner: Any, schema: type, state: dict[str, Any]) -> None:
    """Set the attributes ``schema`` declares on ``owner`` from ``save_state`` output."""
    hints = typing.get_type_hints(schema)
    for item in dataclasses.fields(schema):
        hint = hints[item.name]
        if item.name in state:
            value = state[item.name]
        elif item.default is not dataclasses.MISSING:
            value = item.default
        elif item.default_factory is not dataclasses.MISSING:
            value = item.default_factory()
        else:
            raise KeyError(f"{schema.__name__}: {item.name!r} missing from the saved state")
        if dataclasses.is_dataclass(hint):
            load_state(owner, hint, value)  # type: ignore[arg-type]
            continue
        path = _path(item)
        kind = _optional(hint) if typing.get_origin(hint) in (Union, types.UnionType) else hint
        if kind is np.random.Generator:
            _get(owner, path).bit_generator.state = copy.deepcopy(value)
        elif _stateful(kind):  # restored in place; one the strategy does not have (None) is left alone
            current = _get(owner, path)
            if current is not None and value is not None:
                current.load_state_dict(value)
        else:
            _set(owner, path, from_plain(value, hint))


def to_plain(value: Any, hint: Any) -> Any:
    """``value`` (of type ``hint``) as plain values: new containers, copied arrays."""
    if value is None:
        return None
    if isinstance(value, np.random.Generator):
        return value.bit_generator.state
    if _stateful(value):
        return value.state_dict()
    if isinstance(value, np.ndarray):
        return value.copy()
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return to_plain(value, _optional(hint))
    if origin is dict:
        return {str(k): to_plain(v, args[1]) for k, v in value.items()}
    if origin is list:
        return [to_plain(v, args[0]) for v in value]
    if origin is set:
        return [to_plain(v, args[0]) for v in sorted(value)]
    return copy.deepcopy(value)


def from_plain(value: Any, hint: Any) -> Any:
    """``to_plain`` output (also after a JSON round trip) back as type ``hint``."""
    if value is None:
        return None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return from_plain(value, _optional(hint))
    if origin is dict:
        return {from_plain(k, args[0]): from_plain(v, args[1]) for k, v in value.items()}
    if origin is list:
        return [from_plain(v, args[0]) for v in value]
    if origin is set:
        return {from_plain(v, args[0]) for v in value}
    if hint in (int, float, str, bool):
        return hint(value)
    if hint is np.ndarray:
        return np.array(value, copy=True)
    return copy.deepcopy(value)


def _optional(hint: Any) -> Any:
    options = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    if len(options) != 1:
        raise TypeError(f"state fields may be X | None only, got {hint}")
    return options[0]


def _stateful(value: Any) -> bool:
    return hasattr(value, "state_dict") and hasattr(value, "load_state_dict")


def _path(item: dataclasses.Field[Any]) -> list[str]:
    return str(item.metadata.get(ATTR, item.name)).split(".")


def _get(owner: Any, path: list[str]) -> Any:
    for name in path:
        owner = getattr(owner, name)
    return owner


def _set(owner: Any, path: list[str], value: Any) -> None:
    setattr(_get(owner, path[:-1]), path[-1], value)
