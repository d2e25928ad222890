"""The one ClientApp for every fedlayer method."""

from __future__ import annotations

from collections.abc import Sequence

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlayer.client.methods import client_method
from fedlayer.client.runtime import ClientRuntime
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
        return Message(handler(runtime, message.content, context), reply_to=message)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        """Evaluate the received model on this client's test split."""
        runtime = ClientRuntime.from_context(context, overrides)
        handler = client_method(message.content, "evaluate")
        return Message(handler(runtime, message.content, context), reply_to=message)

    @app.query()
    def query(message: Message, context: Context) -> Message:
        """Say which client this node is: its ``partition-id`` from node config.

        Personalised strategies (pFedLA) ask once per node, so each SuperNode
        gets its own model across rounds; answering needs no data or model.
        """
        partition_id = int(context.node_config.get("partition-id", 0))
        return Message(RecordDict({"metrics": MetricRecord({"partition-id": partition_id})}), reply_to=message)

    return app


app = make_client_app()
