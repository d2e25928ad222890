"""Errors that name what to fix: a configuration field or a strategy argument."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the field."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"config field '{field}': {problem}")
        self.field = field
        self.problem = problem


class ParameterError(ValueError):
    """A strategy argument that cannot work; ``name`` is the keyword argument."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"{name}: {problem}")
        self.name = name
        self.problem = problem


def require(ok: bool, name: str, problem: str, value: object) -> None:
    """Raise ``ParameterError(name, "<problem>, got <value>")`` unless ``ok``."""
    if not ok:
        raise ParameterError(name, f"{problem}, got {value!r}")
