"""Flower 1.39's ``flower-supernode`` with its hard-coded waits shortened, checked against the Flower it was written for.

    python -m fedlayer.client.supernode_launcher --idle-poll 0.2 [flower-supernode options ...]

A SuperNode's main loop (``flwr.supernode.start_client_internal``) pulls a
message from the SuperLink and, when there is none, sleeps 3 s before the next
pull: a message pushed to an idle node waits a median ~1.5 s before the node
even sees it. A node that pulls sooner often finds the message listed while
the ServerApp is still pushing its objects, and Flower's ``pull_objects`` then
waits its first backoff, 1 s (``PULL_INITIAL_BACKOFF``), although the objects
arrive milliseconds later. Once it has a message, ``_push_messages`` looks for
the ClientApp's reply, and for each of the reply's objects, every 0.5 s. None
of these waits has an option in Flower 1.39. This launcher replaces the
``time`` module that ``start_client_internal`` sees with one whose
``sleep(3)`` waits the idle poll instead and whose ``sleep(0.5)`` waits
``SHORT_WAIT``, and starts that module's object pulls at a ``SHORT_WAIT``
backoff (doubling, Flower's cap and limits unchanged); everything else, the
rest of the loop included, is Flower's, and it then runs Flower's own
``flower-supernode`` entry point with the remaining arguments. An idle poll
of 3 leaves Flower's SuperNode untouched.

The patch is bound to Flower 1.39.0 and to the shape of the code it replaces
(those three constant sleeps, and only those, the 3 s one in the main loop's
``if run_id is None`` branch; ``pull_objects`` imported into the module with
an ``initial_backoff`` of 1 s); with another Flower it is skipped with a
warning, so an upgrade runs with Flower's own waits (slower, never wrong)
until this is checked again. ``fedlayer-client`` starts its SuperNode
through this module (``--idle-poll``).
"""

from __future__ import annotations

import ast
import functools
import inspect
import sys
import time
from collections.abc import Sequence
from logging import INFO, WARNING
from types import ModuleType

#: The Flower release this patch was read against (flwr/supernode/start_client_internal.py).
FLOWER_VERSION = "1.39.0"
#: Flower's wait (s) after a pull that found no message, and its wait for a reply (and each of its objects).
FLOWER_IDLE_SLEEP = 3
FLOWER_REPLY_SLEEP = 0.5
#: The wait for a reply, and the first backoff of an object pull, once the patch is in place: only while a
#: message is being received or answered, so it costs nothing idle.
SHORT_WAIT = 0.05


class _ShortWaits:
    """The ``time`` module as ``start_client_internal`` sees it, its two hard-coded waits replaced."""

    def __init__(self, idle_poll: float) -> None:
        self.idle_poll = idle_poll
        self._waits = {FLOWER_IDLE_SLEEP: idle_poll, FLOWER_REPLY_SLEEP: SHORT_WAIT}

    def sleep(self, seconds: float) -> None:
        time.sleep(self._waits.get(seconds, seconds))

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)


def shorten_supernode_waits(idle_poll: float) -> bool:
    """Make this process's SuperNode pull every ``idle_poll`` s when idle, retry a message's object first after
    ``SHORT_WAIT`` s and look for replies every ``SHORT_WAIT`` s.

    Returns whether the patch is in place (False, with a warning, on another Flower).
    """
    if idle_poll <= 0:
        raise ValueError(f"idle_poll must be > 0 seconds, got {idle_poll}")
    import flwr
    from flwr.common.logger import log
    from flwr.supernode import start_client_internal as loop

    if isinstance(loop.time, _ShortWaits):  # already patched in this process
        loop.time = _ShortWaits(idle_poll)
        return True
    if not _patchable(loop, flwr.__version__):
        log(WARNING, "fedlayer: Flower %s is not %s, or its SuperNode loop changed; the SuperNode keeps Flower's "
            "3 s idle sleep, 1 s first object-pull backoff and 0.5 s reply wait (fedlayer/client/supernode_launcher.py)",
            flwr.__version__, FLOWER_VERSION)
        return False
    loop.time = _ShortWaits(idle_poll)  # type: ignore[attr-defined]
    loop.pull_objects = functools.partial(loop.pull_objects, initial_backoff=SHORT_WAIT)  # type: ignore[attr-defined]
    log(INFO, "fedlayer: this SuperNode pulls every %s s when idle, retries an object first after %s s and looks for "
        "replies every %s s (Flower %s: %s s, 1 s, %s s)", idle_poll, SHORT_WAIT, SHORT_WAIT, FLOWER_VERSION,
        FLOWER_IDLE_SLEEP, FLOWER_REPLY_SLEEP)
    return True


def constant_sleeps(source: str) -> list[tuple[str, float, bool]]:
    """Every ``time.sleep(...)`` in ``source``: (enclosing function, constant seconds or nan, whether it
    is the whole body, with ``continue``, of an ``if run_id is None:`` inside a ``while True:``)."""
    tree = ast.parse(source)
    found: list[tuple[str, float, bool]] = []

    def visit(node: ast.AST, function: str, idle_branch: bool, in_loop: bool) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = node.name
        if isinstance(node, ast.While):
            in_loop = isinstance(node.test, ast.Constant) and node.test.value is True
        if isinstance(node, ast.If):
            idle_branch = in_loop and ast.unparse(node.test) == "run_id is None" and [type(s) for s in node.body] == [ast.Expr, ast.Continue]
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "time.sleep":
            argument = node.args[0] if len(node.args) == 1 and not node.keywords else None
            seconds = argument.value if isinstance(argument, ast.Constant) and isinstance(argument.value, (int, float)) else float("nan")
            found.append((function, seconds, idle_branch))
        for child in ast.iter_child_nodes(node):
            visit(child, function, idle_branch, in_loop)

    visit(tree, "", False, False)
    return found


def _patchable(loop: ModuleType, version: str) -> bool:
    """Flower is the release read, ``loop`` imports ``time`` as a module, its sleeps are the three read:
    ``sleep(3)`` in the main loop when no message came, ``sleep(0.5)`` in ``_push_messages`` (for the reply)
    and in its ``yield_object_contents`` (for each of the reply's objects), and its ``pull_objects`` takes
    ``initial_backoff`` with Flower's 1 s default."""
    if version != FLOWER_VERSION or getattr(loop, "time", None) is not time:
        return False
    try:
        backoff = inspect.signature(loop.pull_objects).parameters.get("initial_backoff")
        return backoff is not None and backoff.default == 1 and known_shape(inspect.getsource(loop))
    except (AttributeError, OSError, TypeError, ValueError):  # no such function or no source to check
        return False


def known_shape(source: str) -> bool:
    """Whether ``source`` (of ``start_client_internal``) sleeps where, and only where, Flower 1.39.0's does."""
    try:
        sleeps = constant_sleeps(source)
    except SyntaxError:
        return False
    return sorted(sleeps) == [
        ("_push_messages", FLOWER_REPLY_SLEEP, False),
        ("start_client_internal", FLOWER_IDLE_SLEEP, True),
        ("yield_object_contents", FLOWER_REPLY_SLEEP, False),
    ]


def main(argv: Sequence[str] | None = None) -> None:
    """``--idle-poll S`` first, then ``flower-supernode``'s own arguments, passed to it unchanged."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] != ["--idle-poll"] or len(args) < 2:
        sys.exit("usage: python -m fedlayer.client.supernode_launcher --idle-poll SECONDS [flower-supernode options ...]")
    try:
        idle_poll = float(args[1])
    except ValueError:
        sys.exit(f"--idle-poll must be a number of seconds, got {args[1]!r}")
    if not 0 < idle_poll <= FLOWER_IDLE_SLEEP:
        sys.exit(f"--idle-poll must be > 0 and <= {FLOWER_IDLE_SLEEP} seconds, got {idle_poll}")
    if idle_poll != FLOWER_IDLE_SLEEP:
        shorten_supernode_waits(idle_poll)
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *args[2:]]
    flower_supernode()


if __name__ == "__main__":
    main()
