"""Per-node state that survives between rounds, kept in ``context.state``.

Flower keeps ``context.state`` (a RecordDict) for each node across rounds, in
simulation and in deployment. fedlayer stores the client's full local model
there, so layers a strategy did not synchronise keep evolving on the device,
plus any method memory (LAQ's last upload, FLL's frozen blocks...).
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context

from fedlayer.layers import State, from_arrayrecord, to_arrayrecord

LOCAL_MODEL = "local-model"


def load_local_model(context: Context) -> State | None:
    """The model this node kept from its last round, if any."""
    record = context.state.array_records.get(LOCAL_MODEL)
    return from_arrayrecord(record) if isinstance(record, ArrayRecord) else None


def save_local_model(context: Context, state: State) -> None:
    """Keep the node's model for its next round."""
    context.state[LOCAL_MODEL] = to_arrayrecord(state)


def load_memory(context: Context, name: str) -> ConfigRecord | None:
    """A method's small memory (scalars, bytes) kept under ``name``."""
    record = context.state.config_records.get(name)
    return record if isinstance(record, ConfigRecord) else None


def save_memory(context: Context, name: str, record: ConfigRecord) -> None:
    """Keep a method's small memory for the next round."""
    context.state[name] = record
