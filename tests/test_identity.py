"""Client identity: per-client state and sampling follow partition ids, not Flower node ids."""

import pytest
from flwr.app import Message, MessageType, MetricRecord, RecordDict

from fedlayer.methods.base import LayerwiseStrategy
from fedlayer.methods.fedlama import FedLAMAStrategy
from fedlayer.methods.replies import ReplyRejected, identity_query, parse_identity
from fedlayer.protocol import NO_PARTITION
from tests.conftest import small_state


def _answer(node: int, value, assigned: int | None = None) -> Message:
    query = Message(RecordDict(), dst_node_id=node, message_type=MessageType.QUERY)
    answer = {"partition-id": value} if assigned is None else {"partition-id": value, "client-id": assigned}
    return Message(RecordDict({"metrics": MetricRecord(answer)}), reply_to=query)


def _identified(strategy: LayerwiseStrategy, partition_of: dict[int, int]) -> LayerwiseStrategy:
    nodes = list(partition_of)
    assert {m.metadata.dst_node_id for m in strategy.identity_queries(nodes)} == set(nodes)
    strategy.register_identities(1, [_answer(n, p) for n, p in partition_of.items()], nodes)
    assert strategy.identity_queries(nodes) == []  # asked once per node
    return strategy


def test_parse_identity_checks_the_answer():
    assert parse_identity(_answer(101, 1), {100: 0}, [100, 101]) == (101, 1, False)
    assert parse_identity(_answer(101, NO_PARTITION), {}, [101]) == (101, None, True)  # the server assigns one
    assert parse_identity(_answer(101, NO_PARTITION, assigned=4), {}, [101]) == (101, 4, True)  # kept from before
    with pytest.raises(ReplyRejected, match="already belongs to node 100"):
        parse_identity(_answer(101, 0), {100: 0}, [100, 101])
    assert parse_identity(_answer(101, 0), {100: 0}, [101]) == (101, 0, False)  # node 100 is gone: the id moves
    with pytest.raises(ReplyRejected, match=r"integer in \[0, 3\)"):
        parse_identity(_answer(101, 3), {}, [101], limit=3)
    with pytest.raises(ReplyRejected, match=r"integer in \[0, 3\)"):
        parse_identity(_answer(101, NO_PARTITION, assigned=3), {}, [101], limit=3)
    for bad in (2.5, [1, 2], -7):
        with pytest.raises(ReplyRejected, match="partition-id"):
            parse_identity(_answer(101, bad), {}, [101])
    assert identity_query("fedavg", 5).metadata.message_type == MessageType.QUERY


def test_a_node_without_partition_id_gets_a_free_client_id_and_is_told_it():
    strategy = _identified(LayerwiseStrategy(small_state()), {100: 0, 101: NO_PARTITION, 102: NO_PARTITION})
    assert strategy.client_of == {100: 0, 101: 1, 102: 2}  # not partition 0, not its node id
    messages = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, [100, 101, 102])}
    assert "client-id" not in messages[100].content["config"]  # it has a partition id
    assert messages[101].content["config"]["client-id"] == 1
    # After a restart node 101 comes back under a new node id and answers with the id it kept.
    strategy.register_identities(2, [_answer(555, NO_PARTITION, assigned=1)], [100, 555, 102])
    assert strategy.client_of == {100: 0, 555: 1, 102: 2}
    assert {m.metadata.dst_node_id: m for m in strategy.configure_train(2, [100, 555, 102])}[555].content["config"]["client-id"] == 1


def test_assigned_ids_stay_in_the_client_slots():
    strategy = LayerwiseStrategy(small_state())
    strategy.client_limit = 2
    strategy.register_identities(1, [_answer(n, NO_PARTITION) for n in (7, 8, 9)], [7, 8, 9])
    assert strategy.client_of == {7: 0, 8: 1}
    assert len(strategy.rejections) == 1 and "no free client id" in strategy.rejections[0].reason


def test_a_bad_answer_is_counted_and_the_node_asked_again():
    strategy = LayerwiseStrategy(small_state())
    strategy.register_identities(1, [_answer(7, 2.5)], [7])
    assert strategy.client_of == {} and len(strategy.rejections) == 1
    assert [m.metadata.dst_node_id for m in strategy.identity_queries([7])] == [7]


def test_a_returning_client_takes_its_id_to_its_new_node():
    strategy = _identified(LayerwiseStrategy(small_state()), {100: 0, 101: 1})
    strategy.register_identities(2, [_answer(555, 1)], [100, 555])  # node 101 left, came back as 555
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
    lama = _identified(FedLAMAStrategy(small_state(), phi=3, tau_prime=2, fraction_train=0.5, seed=2), {10: 0, 11: 1, 12: 2, 13: 3})
    cohort = lama.sample_nodes(1, [10, 11, 12, 13])
    clients = sorted(lama.client_id(n) for n in cohort)
    # Mid-block every node re-registers under a new id (a resumed run).
    lama.client_of = {}
    _identified(lama, {20: 0, 21: 1, 22: 2, 23: 3})
    again = lama.sample_nodes(2, [20, 21, 22, 23])
    assert sorted(lama.client_id(n) for n in again) == clients and len(again) == len(cohort)
