"""The one ClientApp for every fedlayer method."""

from __future__ import annotations

from collections.abc import Sequence

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlayer.client.methods import client_method
from fedlayer.client.runtime import ClientRuntime
from fedlayer.strategies.identity import NO_PARTITION, PARTITION_ID
from fedlayer.traffic.client_mod import traffic_mod


def make_client_app(overrides: Sequence[str] | None = None) -> ClientApp:
    """A ClientApp; ``overrides`` fixes the config (else Flower's run config is used).

    ``flwr run`` passes settings through the run config; the in-process
    simulation API (``run_simulation``) has no run config, so ``fedlayer-sim``
    bakes its Hydra overrides into the app instead.
    """
    app = ClientApp(mods=[traffic_mod])

    @app.train()
    def train(message: Message, context: Context) -> Message:
        """Decode, merge with kept state, train, reply with what was asked."""
        runtime = ClientRuntime.from_context(context, overrides)
        handler = client_method(message.content, "train")
        server_round = int(message.content["config"]["server-round"])
        files = runtime.state_files
        if files is not None:
            files.restore(context, before=server_round)
        reply = handler(runtime, message.content, context)
        if files is not None:
            files.save(context, server_round)
        return Message(reply, reply_to=message)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        """Evaluate the received model on this client's test split."""
        runtime = ClientRuntime.from_context(context, overrides)
        handler = client_method(message.content, "evaluate")
        files = runtime.state_files
        if files is not None:  # evaluation follows training in the same round
            files.restore(context, before=int(message.content["config"]["server-round"]) + 1)
        return Message(handler(runtime, message.content, context), reply_to=message)

    @app.query()
    def query(message: Message, context: Context) -> Message:
        """Say which client this node is: its ``partition-id`` from node config (-1: none).

        The server asks once per node, so per-client state and sampling follow
        the client, not Flower's node id; answering needs no data or model.
        """
        partition_id = int(context.node_config.get(PARTITION_ID, NO_PARTITION))
        return Message(RecordDict({"metrics": MetricRecord({PARTITION_ID: partition_id})}), reply_to=message)

    return app


app = make_client_app()
