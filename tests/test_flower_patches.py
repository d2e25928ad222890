"""fedlayer's ServerApp retries a reply's not-yet-pushed object after 0.05 s, not Flower's 1 s, on Flower 1.39 only."""

import logging
import time

import flwr
import pytest
from flwr.superlink.grid import http_grid
from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

from fedlayer.server import flower_patches
from fedlayer.server.flower_patches import REPLY_PULL_INITIAL_BACKOFF, shorten_reply_pull_backoff
from tests.inprocess import InProcessGrid


@pytest.fixture
def restored_http_grid():
    """Flower's own ``pull_objects`` back in ``http_grid`` after the test."""
    original = http_grid.pull_objects
    yield
    http_grid.pull_objects = original


def late_object(available_after: int):
    """A pull function whose object is unavailable for the first ``available_after`` tries."""
    tries = []

    def pull(object_id: str) -> bytes:
        tries.append(time.monotonic())
        if len(tries) <= available_after:
            raise ObjectUnavailableError(object_id)
        return b"content"

    return pull, tries


def test_the_patch_applies_to_flower_1_39_and_shortens_the_first_retry(restored_http_grid):
    assert flwr.__version__ == flower_patches.FLOWER_VERSION  # the pinned Flower (pyproject)
    pull, tries = late_object(1)
    started = time.monotonic()
    assert http_grid.pull_objects(["obj"], pull) == {"obj": b"content"}
    assert tries[1] - started >= 0.75  # Flower's own first backoff: 1 s +- 20%

    assert shorten_reply_pull_backoff(http_grid.HttpGrid(token="t"))
    assert shorten_reply_pull_backoff(http_grid.HttpGrid(token="t"))  # idempotent: not wrapped twice
    pull, tries = late_object(2)
    started = time.monotonic()
    assert http_grid.pull_objects(["obj"], pull) == {"obj": b"content"}
    first, second = tries[1] - started, tries[2] - tries[1]
    assert first < 0.5 and 0.8 * REPLY_PULL_INITIAL_BACKOFF <= first
    assert second >= 1.6 * REPLY_PULL_INITIAL_BACKOFF  # still exponential


def test_the_guard_refuses_another_flower_and_leaves_its_backoff(restored_http_grid, monkeypatch, caplog):
    original = http_grid.pull_objects
    monkeypatch.setattr(flwr, "__version__", "1.40.0")
    with caplog.at_level(logging.WARNING, logger="flwr"):
        assert not shorten_reply_pull_backoff(http_grid.HttpGrid(token="t"))
    assert http_grid.pull_objects is original
    assert "Flower 1.40.0 is not 1.39.0" in caplog.text


def test_other_grids_are_left_alone(restored_http_grid):
    original = http_grid.pull_objects
    assert not shorten_reply_pull_backoff(InProcessGrid(client_app=None, num_nodes=1))
    assert http_grid.pull_objects is original
