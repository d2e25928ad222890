"""Fixtures for end-to-end tests: deployments that are always torn down."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .deployment import LocalDeployment


@pytest.fixture
def local_deployment(tmp_path: Path) -> Iterator[Callable[..., LocalDeployment]]:
    """A factory of ``LocalDeployment``s (kwargs as for the class).

    Every deployment made is stopped at teardown, pass or fail, and its log
    tails are printed (pytest shows them when the test failed).
    """
    made: list[LocalDeployment] = []

    def make(**kwargs) -> LocalDeployment:
        deployment = LocalDeployment(tmp_path / f"deployment-{len(made)}", **kwargs)
        made.append(deployment)
        return deployment

    yield make
    for deployment in made:
        deployment.stop()
        print(deployment.logs_text())
