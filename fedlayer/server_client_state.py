"""Per-client server state that stays on disk beyond an in-memory budget.

LAQ's stored updates and the codec's references are one model-sized state
per client. Held in RAM they grow with the federation; here each client's
state is a versioned ``.npz`` file (the round that wrote it is the version,
``FileVersions``), and at most ``budget_bytes`` of states stay cached in
memory, least recently used first out. The checkpoint holds the index of
current versions, so a resumed run reads exactly the files of its round.

Until ``attach`` gives it a folder (strategies built outside a run, in
tests) a store keeps everything in memory and its checkpoint holds the arrays.
"""

from __future__ import annotations

import io
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from fedlayer.files import FileVersions, atomic_write
from fedlayer.layers import State


def _nbytes(state: State) -> int:
    return sum(value.nbytes for value in state.values())


class ClientStates:
    """``client id -> State``, on disk beyond ``budget_bytes`` in memory (None: no limit)."""

    def __init__(self, name: str, budget_bytes: int | None = None) -> None:
        self.name = name
        self.budget_bytes = budget_bytes
        self.files: FileVersions | None = None
        self.cache: OrderedDict[int, State] = OrderedDict()
        self.cached_bytes = 0

    def attach(self, root: Path) -> None:
        """Keep the states under ``root/<name>`` from now on (the ones held so far are written there)."""
        self.files = FileVersions(Path(root) / self.name, "client", ".npz")
        for client, state in list(self.cache.items()):
            self._write(client, state, 0)
        self._evict()

    def clients(self) -> list[int]:
        """Client ids with a state, in order."""
        return sorted(self.cache) if self.files is None else sorted(self.files.current)

    def __contains__(self, client: int) -> bool:
        return client in self.cache or (self.files is not None and client in self.files.current)

    def __iter__(self) -> Iterator[int]:
        return iter(self.clients())

    def __len__(self) -> int:
        return len(self.clients())

    def __getitem__(self, client: int) -> State:
        state = self.get(client)
        if state is None:
            raise KeyError(client)
        return state

    def get(self, client: int) -> State | None:
        """The client's state (read from disk if it is not cached), or None."""
        if client in self.cache:
            self.cache.move_to_end(client)
            return self.cache[client]
        path = None if self.files is None else self.files.current_path(client)
        if path is None:
            return None
        with np.load(path) as saved:
            state = {key: saved[key] for key in saved.files}
        self._cache(client, state)
        return state

    def put(self, client: int, state: State, version: int) -> None:
        """Store the client's state as written in round ``version``."""
        if self.files is not None:
            self._write(client, state, version)
        self._drop_cached(client)
        self._cache(client, state)

    def pop(self, client: int) -> None:
        """Forget the client's state (its files stay for older checkpoints)."""
        self._drop_cached(client)
        if self.files is not None:
            self.files.current.pop(client, None)

    def state_dict(self) -> dict[str, Any]:
        if self.files is None:
            return {"arrays": {str(c): dict(s) for c, s in self.cache.items()}}
        return {"versions": self.files.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cache, self.cached_bytes = OrderedDict(), 0
        if "versions" in state:
            assert self.files is not None, "attach the store to its folder before restoring a checkpoint of files"
            self.files.load_state_dict(state["versions"])
            return
        for client, arrays in state["arrays"].items():
            self.put(int(client), {key: np.asarray(value) for key, value in arrays.items()}, 0)

    # ----------------------------------------------------------------- cache
    def _write(self, client: int, state: State, version: int) -> None:
        assert self.files is not None
        buffer = io.BytesIO()
        np.savez(buffer, **state)
        self.files.root.mkdir(parents=True, exist_ok=True)
        atomic_write(self.files.path(client, version), buffer.getvalue())
        self.files.commit(client, version)

    def _cache(self, client: int, state: State) -> None:
        self.cache[client] = state
        self.cached_bytes += _nbytes(state)
        self._evict()

    def _drop_cached(self, client: int) -> None:
        if client in self.cache:
            self.cached_bytes -= _nbytes(self.cache.pop(client))

    def _evict(self) -> None:
        """Drop least recently used states beyond the budget (only when they are on disk)."""
        if self.files is None or self.budget_bytes is None:
            return
        while self.cache and self.cached_bytes > self.budget_bytes:
            _, state = self.cache.popitem(last=False)
            self.cached_bytes -= _nbytes(state)
