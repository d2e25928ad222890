"""Typed messages: a frozen dataclass of simple fields <-> the entries of a ConfigRecord or MetricRecord.

Each method declares what goes down (its plan's config) and what comes up
(its reply's method metrics) as one dataclass both halves use: the server
``encode``s what it sends and ``decode``s what it receives, the client the
other way round. A field travels under the record key its ``wire`` names (the
field name if none); a field that is None travels as no key at all, so an
optional setting left at its default adds no bytes.

``decode`` checks every value against the field's type (int, float, str,
bool, lists of them, optional) and then the message's own ``check()`` (the
receiver's contract, so a sender may build any message, also a bad one in a
test); a missing key or a wrong value raises ``MessageError`` naming the key,
which the server's reply validation turns into a refusal.
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, Field, field, fields
from typing import Any, TypeVar, Union

#: The metadata entry of a field's record key.
KEY = "wire-key"

M = TypeVar("M")


class MessageError(ValueError):
    """A message entry that is missing or does not have its field's type."""


def wire(key: str, default: Any = MISSING) -> Any:
    """A message field carried under record key ``key`` (optional when it has a ``default``)."""
    if default is MISSING:
        return field(metadata={KEY: key})
    return field(default=default, metadata={KEY: key})


def key_of(item: Field[Any]) -> str:
    """The record key a dataclass field travels under."""
    return str(item.metadata.get(KEY, item.name))


def encode(message: Any) -> dict[str, Any]:
    """The record entries of ``message`` (values as they are; None: no entry)."""
    out: dict[str, Any] = {}
    for item in fields(message):
        value = getattr(message, item.name)
        if value is not None:
            out[key_of(item)] = list(value) if isinstance(value, tuple) else value
    return out


def encode_metrics(message: Any) -> dict[str, float]:
    """``encode`` for a MetricRecord: numbers travel as floats (what the server reads back)."""
    return {key: float(value) for key, value in encode(message).items()}


def within(key: str, value: float | None, low: float, high: float) -> None:
    """For a message's ``check``: ``MessageError`` unless ``value`` (None: absent) lies in ``[low, high]``."""
    if value is not None and not (math.isfinite(value) and low <= value <= high):
        raise MessageError(f"metric {key!r} must lie in [{low:g}, {high:g}], got {value!r}")


def decode(cls: type[M], record: Mapping[str, Any], *, metrics: bool = False) -> M:
    """A ``cls`` from a record's entries (others are ignored), checked; ``MessageError`` if one is missing or wrong.

    ``metrics``: the record is a MetricRecord (or its values as floats), so an integral float passes as an int.
    """
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for item in fields(cls):  # type: ignore[arg-type]
        key = key_of(item)
        if key not in record:
            if item.default is MISSING and item.default_factory is MISSING:
                raise MessageError(f"{key!r} missing")
            continue
        values[item.name] = checked(record[key], hints[item.name], key, metrics)
    message = cls(**values)
    check = getattr(message, "check", None)
    if check is not None:
        check()
    return message


def checked(value: Any, hint: Any, key: str, metrics: bool = False) -> Any:
    """``value`` as type ``hint`` (int, float, str, bool, list of one, optional); ``MessageError`` if it is not.

    An int passes as a float; with ``metrics`` (whose values are floats) an integral float passes as an int.
    """
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if value is None and len(options) < len(typing.get_args(hint)):
            return None
        if len(options) != 1:
            raise TypeError(f"message field {key!r}: only optional simple types are supported, got {hint}")
        return checked(value, options[0], key, metrics)
    if origin is list:
        (inner,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise MessageError(f"{key!r} must be a list, got {value!r}")
        return [checked(v, inner, key, metrics) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if metrics and isinstance(value, float) and math.isfinite(value) and value == int(value):
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"message field {key!r}: unsupported type {hint}")
    raise MessageError(f"{key!r} must be {'an integer' if hint is int else hint.__name__}, got {value!r}")
