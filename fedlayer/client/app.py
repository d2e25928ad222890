"""The one ClientApp for every fedlayer method."""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from omegaconf import DictConfig

from fedlayer.client.runtime import (
    client_config,
    client_runtime,
    host_record,
    node_client_id,
    node_folder,
    state_files,
)
from fedlayer.codec.client import close_upload, open_download
from fedlayer.layers import State
from fedlayer.methods import METHODS, Method
from fedlayer.methods.client_half import round_config, server_round_of
from fedlayer.models.kept import KeptModel
from fedlayer.privacy import Privacy
from fedlayer.privacy.client import privatise_reply, training_reference
from fedlayer.wire.records import (
    CLIENT_ID,
    CONFIG,
    HOST,
    METHOD,
    METRICS,
    NO_PARTITION,
    PARTITION_ID,
)
from fedlayer.traffic.client_mod import traffic_mod
from fedlayer.workload import initial_state


def method_of(content: RecordDict) -> Method:
    """Both halves of the method the message names."""
    config = content.config_records.get(CONFIG)
    if not isinstance(config, ConfigRecord) or METHOD not in config:
        raise ValueError(f"message has no {CONFIG!r} record naming a {METHOD}")
    name = str(config[METHOD])
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; this client knows {sorted(METHODS)}")
    return METHODS[name]


def make_client_app(cfg: DictConfig | None = None, kept: KeptModel | None = None) -> ClientApp:
    """A ClientApp; ``cfg`` fixes the resolved config (else it is read from Flower's run config).

    ``flwr run`` passes settings through the run config; the in-process
    simulation API (``run_simulation``) has no run config, so ``fedlayer-sim``
    hands the server's resolved config to the app instead. With ``kept`` (a
    warm worker's session of one run and node), every message of the app
    loads its state into the one model kept there instead of building one.
    """
    app = ClientApp(mods=[traffic_mod])

    @app.train()
    def train(message: Message, context: Context) -> Message:
        """Decode, merge with kept state, train, reply with what was asked."""
        run_cfg = client_config(context, cfg)
        handler = method_of(message.content).train
        server_round = server_round_of(message.content)
        client_id = node_client_id(context, message.content)
        files = state_files(context, run_cfg, client_id, round_config(message.content).run_key)
        if files is not None:
            files.restore(context, before=server_round)
        runtime = client_runtime(context, run_cfg, client_id, node_folder(context, run_cfg, client_id), kept)

        def initial() -> State:
            return initial_state(run_cfg, runtime.train_data)

        content, codec = open_download(message.content, context, initial, train=True)
        privacy = Privacy.from_config(run_cfg.get("privacy"))
        reference = training_reference(content, context) if privacy.active else {}
        reply = handler(runtime, content, context)
        reply = privatise_reply(reply, reference, content, context, privacy, initial)  # before the codec encodes it
        reply = close_upload(reply, codec, context)
        reply[HOST] = host_record(context)
        if files is not None:
            files.save(context, server_round)
        return Message(reply, reply_to=message)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        """Evaluate the received model on this client's test split."""
        run_cfg = client_config(context, cfg)
        handler = method_of(message.content).evaluate
        client_id = node_client_id(context, message.content)
        files = state_files(context, run_cfg, client_id, round_config(message.content).run_key)
        if files is not None:  # evaluation follows training in the same round
            files.restore(context, before=server_round_of(message.content) + 1)
        runtime = client_runtime(context, run_cfg, client_id, node_folder(context, run_cfg, client_id), kept)
        content, _ = open_download(message.content, context, lambda: initial_state(run_cfg, runtime.train_data), train=False)
        return Message(handler(runtime, content, context), reply_to=message)

    @app.query()
    def query(message: Message, context: Context) -> Message:
        """Say which client this node is: its ``partition-id`` (-1: none), and a client id it was assigned.

        The server asks once per node, so per-client state and sampling follow
        the client, not Flower's node id; answering needs no data or model.
        """
        answer = {PARTITION_ID: int(context.node_config.get(PARTITION_ID, NO_PARTITION))}
        assigned = node_client_id(context)
        if answer[PARTITION_ID] == NO_PARTITION and assigned != NO_PARTITION:
            answer[CLIENT_ID] = assigned
        return Message(RecordDict({METRICS: MetricRecord(answer)}), reply_to=message)

    return app


app = make_client_app()
