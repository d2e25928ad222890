"""One change to Flower 1.39's ServerApp runtime, checked against the Flower it was written for.

A deployed ServerApp pulls a reply's objects with Flower's ``pull_objects``
(``flwr.superlink.grid.http_grid``). A reply whose message is listed while its
objects are still being pushed raises ``ObjectUnavailableError`` once, and
Flower then waits its first backoff, ``PULL_INITIAL_BACKOFF`` = 1 s (doubling
up to 10 s), before the second try, although the objects arrive milliseconds
later. fedlayer polls for replies every ``federation.poll_interval`` (0.05 s),
so the first pull often comes that early: a median 0.65 s per cnn reply.
Here the ServerApp's own grid starts at ``REPLY_PULL_INITIAL_BACKOFF``
instead; the retries, the cap and the limits stay Flower's.

The patch is bound to Flower 1.39.0 and to the shape of the code it replaces
(``pull_objects`` imported into ``http_grid`` with an ``initial_backoff``
parameter); with another Flower it is skipped with a warning, so an upgrade
runs with Flower's own backoff (slower, never wrong) until this is checked again.
"""

from __future__ import annotations

import functools
import inspect
from logging import WARNING
from typing import Any

import flwr
from flwr.common.logger import log

#: The Flower release this patch was read against (flwr/superlink/grid/http_grid.py,
#: flwr/supercore/inflatable/inflatable_utils.py, flwr/supercore/constant.py).
FLOWER_VERSION = "1.39.0"
#: First wait (s) after an object of a reply is not there yet; Flower's is 1 s.
REPLY_PULL_INITIAL_BACKOFF = 0.05
_MARK = "_fedlayer_initial_backoff"


def shorten_reply_pull_backoff(grid: Any) -> bool:
    """Make ``grid`` (Flower's ``HttpGrid``) retry a reply's first unavailable object after 0.05 s.

    Returns whether the patch is in place. Another grid (simulation's
    in-memory one, the tests' in-process one) pulls no objects: nothing to do.
    """
    from flwr.superlink.grid import http_grid

    if not isinstance(grid, http_grid.HttpGrid):
        return False
    current = http_grid.pull_objects
    if getattr(current, _MARK, None) is not None:
        return True
    if not _patchable(current):
        log(WARNING, "fedlayer: Flower %s is not %s; the ServerApp keeps Flower's 1 s first backoff for reply pulls "
            "(fedlayer/server/flower_patches.py)", flwr.__version__, FLOWER_VERSION)
        return False
    patched = functools.partial(current, initial_backoff=REPLY_PULL_INITIAL_BACKOFF)
    setattr(patched, _MARK, REPLY_PULL_INITIAL_BACKOFF)
    http_grid.pull_objects = patched
    return True


def _patchable(pull_objects: Any) -> bool:
    """Flower is the release read, and ``pull_objects`` still takes ``initial_backoff`` with its default 1 s."""
    if flwr.__version__ != FLOWER_VERSION:
        return False
    try:
        parameter = inspect.signature(pull_objects).parameters.get("initial_backoff")
    except (TypeError, ValueError):
        return False
    return parameter is not None and parameter.default == 1
