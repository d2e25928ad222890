"""``fedlayer.client.supernode_launcher``: the SuperNode's 3 s idle sleep, 1 s first object-pull backoff and
0.5 s reply wait shortened, on Flower 1.39.0 only."""

import inspect
import logging
import subprocess
import sys
import time

import flwr
import pytest
from flwr.supernode import start_client_internal as loop

from fedlayer.client import supernode_launcher
from fedlayer.client.supernode_launcher import SHORT_WAIT, constant_sleeps, known_shape, shorten_supernode_waits
from tests.test_flower_patches import late_object


@pytest.fixture
def restored_loop():
    """Flower's own ``time`` and ``pull_objects`` back in ``start_client_internal`` after the test."""
    pull_objects = loop.pull_objects
    yield
    loop.time = time
    loop.pull_objects = pull_objects


def first_retry(pull_objects) -> float:
    """Seconds from the first pull of an object not yet there to the second."""
    pull, tries = late_object(1)
    assert pull_objects(["obj"], pull) == {"obj": b"content"}
    return tries[1] - tries[0]


def took(sleep, seconds: float) -> float:
    started = time.monotonic()
    sleep(seconds)
    return time.monotonic() - started


def test_flower_1_39_sleeps_3_s_when_a_pull_finds_no_message_and_nowhere_else(restored_loop):
    """Read against Flower's source: if this fails, Flower's loop changed and the patch must be read again."""
    assert flwr.__version__ == supernode_launcher.FLOWER_VERSION  # the pinned Flower (pyproject)
    source = inspect.getsource(loop)
    assert sorted(constant_sleeps(source)) == [
        ("_push_messages", 0.5, False),  # waiting for the ClientApp's reply
        ("start_client_internal", 3, True),  # the main loop, `if run_id is None: time.sleep(3); continue`
        ("yield_object_contents", 0.5, False),  # waiting for each of the reply's objects
    ]
    assert known_shape(source)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("time.sleep(3)\n", "time.sleep(2)\n"),  # another idle sleep
        ("                time.sleep(3)\n                continue\n", "                continue\n"),  # none in the loop
        ("        time.sleep(0.5)\n", "        time.sleep(0.5)\n        time.sleep(3)\n"),  # a 3 s sleep elsewhere
        ("if run_id is None:", "if run_id is None and state:"),  # another branch
    ],
)
def test_another_loop_shape_is_not_patched(old, new):
    source = inspect.getsource(loop)
    assert old in source
    assert not known_shape(source.replace(old, new, 1))


def test_the_patch_shortens_the_idle_sleep_the_first_object_pull_retry_and_the_reply_wait_only(restored_loop):
    assert loop.time is time
    assert took(loop.time.sleep, 0.5) >= 0.45  # Flower's own
    assert first_retry(loop.pull_objects) >= 0.75  # Flower's first backoff: 1 s +- 20%
    assert shorten_supernode_waits(0.2)
    assert shorten_supernode_waits(0.1)  # again: the new poll, not wrapped twice
    assert 0.09 <= took(loop.time.sleep, 3) < 1.0
    assert SHORT_WAIT * 0.9 <= took(loop.time.sleep, 0.5) < 0.3
    assert 0.25 <= took(loop.time.sleep, 0.3) < 1.0  # any other wait is Flower's
    assert loop.time.monotonic is time.monotonic
    assert 0.8 * SHORT_WAIT <= first_retry(loop.pull_objects) < 0.5
    pull, tries = late_object(2)
    assert loop.pull_objects(["obj"], pull) == {"obj": b"content"}
    assert tries[2] - tries[1] >= 1.6 * SHORT_WAIT  # still exponential


def test_the_guard_refuses_another_flower_and_leaves_its_loop(restored_loop, monkeypatch, caplog):
    monkeypatch.setattr(flwr, "__version__", "1.40.0")
    pull_objects = loop.pull_objects
    with caplog.at_level(logging.WARNING, logger="flwr"):
        assert not shorten_supernode_waits(0.2)
    assert loop.time is time and loop.pull_objects is pull_objects
    assert "Flower 1.40.0 is not 1.39.0" in caplog.text


@pytest.mark.parametrize(("argv", "problem"), [([], "usage:"), (["--idle-poll", "x"], "a number"), (["--idle-poll", "0"], "> 0 and <= 3")])
def test_the_launcher_refuses_a_bad_idle_poll(argv, problem):
    done = subprocess.run([sys.executable, "-m", "fedlayer.client.supernode_launcher", *argv], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1 and problem in done.stderr


def test_the_launcher_runs_flowers_supernode_with_its_arguments():
    done = subprocess.run([sys.executable, "-m", "fedlayer.client.supernode_launcher", "--idle-poll", "0.2", "--version"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and flwr.__version__ in done.stdout + done.stderr


def test_the_guard_refuses_a_pull_objects_without_flowers_1_s_first_backoff(restored_loop, monkeypatch):
    monkeypatch.setattr(loop, "pull_objects", lambda object_ids, pull_object_fn: {})
    assert not shorten_supernode_waits(0.2)
    assert loop.time is time
