"""Client identity: per-client state and sampling follow partition ids, not Flower node ids."""

import uuid

import pytest
from flwr.app import Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode

from fedlayer.config import compose_config, resolve_resume
from fedlayer.errors import ConfigError
from fedlayer.layers import states_equal, to_arrayrecord
from fedlayer.methods.base import LayerwiseStrategy
from fedlayer.methods.fedlama import FedLAMAStrategy
from fedlayer.methods.pfedla import PFedLAStrategy
from fedlayer.methods.replies import ReplyRejected, identity_query, parse_identity
from fedlayer.wire.records import ASSIGNED_BASE as B
from fedlayer.wire.records import NO_PARTITION
from fedlayer.server.checkpoint import Checkpoint, decode_checkpoint, encode_checkpoint
from fedlayer.server.loop import FederatedRun
from fedlayer.server.node_keys import NODE_AUTH_ENV, binds_keys
from tests.conftest import small_state


def _reply(query: Message, value, assigned: int | None = None) -> Message:
    """What the ClientApp answers: its partition id, or NO_PARTITION and the client id it kept."""
    answer = {"partition-id": value} if assigned is None else {"partition-id": value, "client-id": assigned}
    return Message(RecordDict({"metrics": MetricRecord(answer)}), reply_to=query)


def _answer(node: int, value, assigned: int | None = None) -> Message:
    return _reply(Message(RecordDict(), dst_node_id=node, message_type=MessageType.QUERY), value, assigned)


def _register(strategy: LayerwiseStrategy, server_round: int, answers: dict, connected: list[int], keys: dict | None = None) -> None:
    """Ask the strategy's identity queries, push them (a grid gives each its id), answer ``answers``
    (node -> partition id, or (NO_PARTITION, kept client id)) and register the replies."""
    queries = {m.metadata.dst_node_id: m for m in strategy.identity_queries(connected)}
    for query in queries.values():
        query.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # what Flower's grids do on push
    replies = [_reply(queries[n], *(a if isinstance(a, tuple) else (a,))) for n, a in answers.items()]
    strategy.register_identities(server_round, replies, connected, *([keys] if keys is not None else []))


def _identified(strategy: LayerwiseStrategy, partition_of: dict[int, int]) -> LayerwiseStrategy:
    nodes = list(partition_of)
    assert {m.metadata.dst_node_id for m in strategy.identity_queries(nodes)} == set(nodes)
    _register(strategy, 1, partition_of, nodes)
    assert strategy.identity_queries(nodes) == []  # asked once per node
    return strategy


def test_parse_identity_checks_the_answer():
    assert parse_identity(_answer(101, 1), {100: 0}, [100, 101]) == (101, 1, False)
    assert parse_identity(_answer(101, NO_PARTITION), {}, [101]) == (101, None, True)  # the server assigns one
    assert parse_identity(_answer(101, NO_PARTITION, assigned=B + 4), {}, [101]) == (101, B + 4, True)  # kept from before
    with pytest.raises(ReplyRejected, match="already belongs to node 100"):
        parse_identity(_answer(101, 0), {100: 0}, [100, 101])
    assert parse_identity(_answer(101, 0), {100: 0}, [101]) == (101, 0, False)  # node 100 is gone: the id moves
    with pytest.raises(ReplyRejected, match=r"integer in \[0, 3\)"):
        parse_identity(_answer(101, 3), {}, [101], limit=3)
    with pytest.raises(ReplyRejected, match=rf"client-id must be a server-assigned id, an integer in \[{B}, {B + 3}\)"):
        parse_identity(_answer(101, NO_PARTITION, assigned=B + 3), {}, [101], limit=3)
    with pytest.raises(ReplyRejected, match=rf"client-id must be a server-assigned id, an integer >= {B}"):
        parse_identity(_answer(101, NO_PARTITION, assigned=0), {}, [101])  # a partition's id is not an assigned one
    with pytest.raises(ReplyRejected, match=rf"partition-id must be an integer in \[0, {B}\)"):
        parse_identity(_answer(101, B), {}, [101])
    for bad in (2.5, [1, 2], -7):
        with pytest.raises(ReplyRejected, match="partition-id"):
            parse_identity(_answer(101, bad), {}, [101])
    assert identity_query("fedavg", 5).metadata.message_type == MessageType.QUERY


def test_a_node_without_partition_id_gets_a_free_client_id_and_is_told_it():
    strategy = _identified(LayerwiseStrategy(small_state()), {100: 0, 101: NO_PARTITION, 102: NO_PARTITION})
    assert strategy.client_of == {100: 0, 101: B, 102: B + 1}  # not a partition's id, not its node id
    messages = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, [100, 101, 102])}
    assert "client-id" not in messages[100].content["config"]  # it has a partition id
    assert messages[101].content["config"]["client-id"] == B
    # After a restart node 101 comes back under a new node id and answers with the id it kept.
    _register(strategy, 2, {555: (NO_PARTITION, B)}, [100, 555, 102])
    assert strategy.client_of == {100: 0, 555: B, 102: B + 1}
    assert {m.metadata.dst_node_id: m for m in strategy.configure_train(2, [100, 555, 102])}[555].content["config"]["client-id"] == B


def test_assigned_ids_stay_in_the_client_slots():
    strategy = LayerwiseStrategy(small_state())
    strategy.client_limit = 2
    _register(strategy, 1, {n: NO_PARTITION for n in (7, 8, 9)}, [7, 8, 9])
    assert strategy.client_of == {7: B + 1, 8: B} and [strategy.slot(n) for n in (7, 8)] == [1, 0]  # slots from the top
    assert len(strategy.rejections) == 1 and "no free client id" in strategy.rejections[0].reason


def test_a_bad_answer_is_counted_and_the_node_asked_again():
    strategy = LayerwiseStrategy(small_state())
    _register(strategy, 1, {7: 2.5}, [7])
    assert strategy.client_of == {} and len(strategy.rejections) == 1
    assert [m.metadata.dst_node_id for m in strategy.identity_queries([7])] == [7]


def test_a_returning_client_takes_its_id_to_its_new_node():
    strategy = _identified(LayerwiseStrategy(small_state()), {100: 0, 101: 1})
    _register(strategy, 2, {555: 1}, [100, 555])  # node 101 left, came back as 555
    assert strategy.client_of == {100: 0, 555: 1}


def test_sampling_picks_the_same_clients_whatever_the_node_ids():
    partitions = list(range(10))
    runs = []
    for node_ids in ([1000 + p for p in partitions], [97_000 - 13 * p for p in partitions]):
        strategy = _identified(LayerwiseStrategy(small_state(), fraction_train=0.3, seed=4), dict(zip(node_ids, partitions)))
        runs.append([[strategy.client_id(n) for n in strategy.sample_nodes(r, sorted(node_ids))] for r in range(1, 6)])
    assert runs[0] == runs[1]
    assert len({tuple(r) for r in runs[0]}) > 1  # and it does vary between rounds


def test_fedlama_cohort_survives_new_node_ids():
    lama = _identified(FedLAMAStrategy(small_state(), phi=3, local_steps=2, fraction_train=0.5, seed=2), {10: 0, 11: 1, 12: 2, 13: 3})
    cohort = lama.sample_nodes(1, [10, 11, 12, 13])
    clients = sorted(lama.client_id(n) for n in cohort)
    # Mid-block every node re-registers under a new id (a resumed run).
    lama.client_of = {}
    _identified(lama, {20: 0, 21: 1, 22: 2, 23: 3})
    again = lama.sample_nodes(2, [20, 21, 22, 23])
    assert sorted(lama.client_id(n) for n in again) == clients and len(again) == len(cohort)


# --- issue 24, item 5: one identity, bound to the node ------------------------------------
def _pushed(messages: list[Message]) -> list[Message]:
    for message in messages:
        message.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # what Flower's grids do on push
    return messages


def _keyed(**kwargs) -> LayerwiseStrategy:
    """A strategy that binds client ids to node keys (``identity.bind=key``)."""
    strategy = LayerwiseStrategy(small_state(), **kwargs)
    strategy.bindings.enabled = True
    return strategy


def test_an_unidentified_node_is_never_sampled_and_its_replies_are_refused():
    strategy = LayerwiseStrategy(small_state(), fraction_evaluate=1.0, up_bits=8)
    queries = {m.metadata.dst_node_id: m for m in _pushed(strategy.identity_queries([100, 101, 102]))}
    failed = Message(Error(ErrorCode.UNKNOWN, "ClientApp crashed"), reply_to=queries[102])  # node 102's query failed
    strategy.register_identities(1, [_reply(queries[100], 0), _reply(queries[101], 1), failed], [100, 101, 102])
    assert strategy.client_of == {100: 0, 101: 1} and "identity query failed" in strategy.rejections[-1].reason
    # node 103 connected after the queries went out
    connected = [100, 101, 102, 103]
    assert sorted(m.metadata.dst_node_id for m in strategy.configure_train(1, connected)) == [100, 101]
    assert sorted(m.metadata.dst_node_id for m in strategy.configure_evaluate(1, connected)) == [100, 101]
    with pytest.raises(KeyError):
        strategy.client_id(102)  # no state is ever keyed by its node id
    before = {k: v.copy() for k, v in strategy.global_state.items()}
    rejected = len(strategy.rejections)
    stray = Message(
        RecordDict({"arrays": to_arrayrecord(small_state()), "metrics": MetricRecord({"num-examples": 10})}),
        reply_to=Message(RecordDict(), dst_node_id=102, message_type=MessageType.TRAIN),
    )
    assert strategy.aggregate_train(1, [stray]) is None
    assert [r.reason for r in strategy.rejections[rejected:]] == ["reply from a node whose client id is not registered"]
    assert states_equal(strategy.global_state, before)


def test_a_device_never_takes_a_partition_id():
    strategy = LayerwiseStrategy(small_state())
    _register(strategy, 1, {101: NO_PARTITION}, [101])  # a device with its own data connects first
    _register(strategy, 2, {100: 0}, [100, 101])  # partition 0 comes later, the device still connected
    assert strategy.client_of == {101: B, 100: 0} and strategy.rejections == []


def test_pfedla_gives_a_device_a_free_slot_and_refuses_a_partition_whose_slot_it_uses(tmp_path):
    pfedla = PFedLAStrategy(small_state(), num_clients=3)
    pfedla.attach_run_dir(tmp_path)
    _register(pfedla, 1, {100: 0, 101: 1, 102: NO_PARTITION}, [100, 101, 102])
    assert pfedla.client_of == {100: 0, 101: 1, 102: B + 2} and pfedla.slot(102) == 2  # the top slot
    messages = {m.metadata.dst_node_id: m for m in pfedla.configure_train(1, [100, 101, 102])}
    assert messages[102].content["config"]["client-id"] == B + 2 and len(messages) == 3
    _register(pfedla, 2, {103: 2}, [100, 101, 102, 103])  # every slot is in use
    assert 103 not in pfedla.client_of and "client slot 2 is used by client id" in pfedla.rejections[-1].reason


def test_assigned_ids_and_bindings_are_checkpointed():
    strategy = _keyed()
    _register(strategy, 1, {100: 0, 101: NO_PARTITION}, [100, 101], keys={100: "k0", 101: "k1"})
    saved = Checkpoint(1, strategy.global_state, strategy.state_dict(), {}, {})
    state = decode_checkpoint(encode_checkpoint(saved)).strategy_state
    resumed = _keyed()
    resumed.load_state_dict(state)
    assert resumed.assigned == {B} and resumed.bindings.keys == {0: "k0", B: "k1"}
    # The resumed run sees new node ids. A new device gets a new id, not the first device's;
    # the first device gets its own back by its key (here without its state folder), and
    # another key's claim of partition 0 is refused.
    _register(resumed, 2, {200: NO_PARTITION, 201: NO_PARTITION, 202: 0}, [200, 201, 202], keys={200: "k2", 201: "k1", 202: "k9"})
    assert resumed.client_of == {200: B + 1, 201: B}
    assert resumed.rejections[-1].node_id == 202 and "client id 0 is bound to another node's key" in resumed.rejections[-1].reason


def test_a_bound_client_id_is_refused_to_another_key_until_the_operator_releases_it():
    strategy = _keyed()
    _register(strategy, 1, {100: 3}, [100], keys={100: "key-a"})
    # node 100 disconnects; another authenticated node claims client 3 (e.g. for its pFedLA model)
    _register(strategy, 2, {200: 3}, [200], keys={200: "key-b"})
    assert 200 not in strategy.client_of and strategy.configure_train(2, [200]) == []
    assert strategy.rejections[-1].reason == "client id 3 is bound to another node's key (the operator releases it with identity.release=[3])"
    # the same key, registered again under a new node id, gets its client id back
    _register(strategy, 3, {300: 3}, [200, 300], keys={200: "key-b", 300: "key-a"})
    assert strategy.client_of[300] == 3
    # a key is bound to one client id; a node without a key the SuperLink vouches for binds nothing
    _register(strategy, 3, {400: 4, 500: 5}, [300, 400, 500], keys={300: "key-a", 400: "key-a"})
    assert [r.reason for r in strategy.rejections[-2:]] == [
        "this node's key is bound to client id 3, not 4",
        "the SuperLink gives no public key for this node; identity.bind=key needs SuperNode authentication",
    ]
    strategy.release_bindings([3])
    _register(strategy, 4, {200: 3}, [200], keys={200: "key-b"})  # node 300 has gone
    assert strategy.client_of[200] == 3 and strategy.bindings.keys == {3: "key-b"}


def test_identity_config_and_its_default(monkeypatch):
    assert compose_config(["identity.release=[3,5]"]).identity.release == [3, 5]
    for override, field in (("identity.release=[-1]", "identity.release"), ("identity.release=3", "identity.release"),
                            ("identity.bind=yes", "identity.bind")):
        with pytest.raises(ConfigError, match=f"config field '{field}'"):
            compose_config([override])
    monkeypatch.delenv(NODE_AUTH_ENV, raising=False)
    assert not binds_keys("auto") and binds_keys("key") and not binds_keys("none")
    monkeypatch.setenv(NODE_AUTH_ENV, "1")  # fedlayer-server started the SuperLink with node authentication
    assert binds_keys("auto") and not binds_keys("none")


def test_a_resume_takes_identity_release_from_its_own_command_line(tmp_path):
    run = FederatedRun(compose_config(["dataset=digits", "model=linear", f"output_dir={tmp_path}", "run_name=run"]))
    run.strategy.bindings.enabled = True
    _register(run.strategy, 1, {100: 0, 101: 1}, [100, 101], keys={100: "k0", 101: "k1"})
    run.save_checkpoint(1, 1.0)
    cfg = resolve_resume(compose_config([f"resume={tmp_path / 'run'}", "identity.release=[1]", "identity.bind=none"]))
    assert list(cfg.identity.release) == [1] and cfg.identity.bind == "auto"  # the run's own binding mode stays
    resumed = FederatedRun(cfg)  # restores the checkpoint, then releases
    assert resumed.strategy.assigned == set() and resumed.strategy.bindings.keys == {0: "k0"}
