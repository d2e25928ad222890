"""A reply answers the message it was sent, encoded as the run configured (issue 24, items 3 and 4).

Each case drives the real ``configure_train`` / ``aggregate_train`` path in the
fault tests' unit setting (``benchmarks.faults.round_one_strategy``: the cnn on
digits, 7 nodes, every node identified and sampled): the honest replies of four
nodes plus one reply from the fifth that carries an honest update but answers
another message (another round's, another node's, an evaluate message or an
identity query), or is encoded otherwise than ``codec.up_bits`` / LAQ's
``bits`` say. It must be refused with a reason that says what is wrong, and the
model and the method's checkpointed state must be bitwise those of the honest
replies alone.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from benchmarks.fault_matrix import checkpoint, same
from benchmarks.faults import (
    CODEC_SETTING,
    ROUND_NODES,
    codec_reply,
    honest_reply,
    honest_state,
    identity_query_to,
    laq_reply,
    laq_state,
    laq_upload,
    push,
    readdressed,
    round_one_strategy,
    sent_message,
)
from fedlayer.layers import states_equal
from fedlayer.methods.base import LayerwiseStrategy

HONEST = ROUND_NODES[:4]
FAULTY = ROUND_NODES[4]


def _reply(strategy: LayerwiseStrategy, node: int, seed: int) -> Message:
    """``node``'s honest reply to ``strategy``'s train message of this round."""
    return honest_reply(strategy, node, ROUND_NODES.index(node), seed)


def _honest(strategy: LayerwiseStrategy, seed: int = 0) -> list[Message]:
    return [_reply(strategy, node, seed) for node in HONEST]


def _pair(tmp_path, name: str = "fedavg", overrides: tuple[str, ...] = ()) -> tuple[LayerwiseStrategy, LayerwiseStrategy]:
    """Two identical strategies in round 1: one gets the faulty reply, the other the honest replies alone."""
    return (
        round_one_strategy(name, tmp_path / "mixed", ROUND_NODES, overrides),
        round_one_strategy(name, tmp_path / "alone", ROUND_NODES, overrides),
    )


def _refused_alone(tmp_path, mixed, alone, bad: Message, server_round: int = 1) -> str:
    """Offer ``bad`` first, then the honest replies; ``bad`` alone is refused and nothing differs
    from the honest-only round. Returns the refusal's reason."""
    mixed.aggregate_train(server_round, [bad, *_honest(mixed)])
    alone.aggregate_train(server_round, _honest(alone))
    assert alone.rejections == []
    assert [r.node_id for r in mixed.rejections] == [bad.metadata.src_node_id], [r.reason for r in mixed.rejections]
    assert states_equal(mixed.global_state, alone.global_state)
    assert same(checkpoint(mixed, tmp_path / "mixed"), checkpoint(alone, tmp_path / "alone"))
    return mixed.rejections[0].reason


# ------------------------------------------------------------------ item 3: what a reply answers
def test_a_stale_reply_answering_last_rounds_message_is_refused(tmp_path):
    mixed, alone = _pair(tmp_path)
    stale = _reply(mixed, FAULTY, seed=100)  # its reply to round 1's message, pulled in round 2
    for strategy in (mixed, alone):
        strategy.aggregate_train(1, _honest(strategy))
        strategy.configure_train(2, list(ROUND_NODES))
    reason = _refused_alone(tmp_path, mixed, alone, stale, server_round=2)
    own = sent_message(mixed, FAULTY).metadata.message_id
    assert reason == (
        f"answers message {stale.metadata.reply_to_message_id!r}, which is no train message of round 2 "
        f"(another round's?), not the train message {own!r} sent to it in round 2"
    )


def test_a_reply_to_next_rounds_message_is_refused(tmp_path):
    mixed, alone = _pair(tmp_path)
    ahead = round_one_strategy("fedavg", tmp_path / "ahead", ROUND_NODES)  # the same run, a round further
    ahead.aggregate_train(1, _honest(ahead))
    ahead.configure_train(2, list(ROUND_NODES))
    future = readdressed(_reply(mixed, FAULTY, 100), sent_message(ahead, FAULTY), FAULTY)
    reason = _refused_alone(tmp_path, mixed, alone, future)
    assert reason.startswith(f"answers message {future.metadata.reply_to_message_id!r}, which is no train message of round 1")


def test_a_reply_stating_another_round_or_aggregated_in_another_round_is_refused(tmp_path):
    mixed, alone = _pair(tmp_path)
    later = _reply(mixed, FAULTY, 100)
    later.content["config"] = ConfigRecord({"server-round": 2})  # it answers round 1's message, says round 2
    assert _refused_alone(tmp_path, mixed, alone, later) == "the reply says server-round 2, this is round 1"
    # replies to round 1's messages are never aggregated as another round's
    strategy = round_one_strategy("fedavg", tmp_path / "other", ROUND_NODES)
    assert strategy.aggregate_train(2, _honest(strategy)) is None
    assert {r.reason for r in strategy.rejections} == {"the train messages on record are round 1's, not round 2's"}


def test_a_reply_to_another_nodes_message_is_refused(tmp_path):
    mixed, alone = _pair(tmp_path)
    theirs = readdressed(_reply(mixed, FAULTY, 100), sent_message(mixed, ROUND_NODES[0]), FAULTY)
    assert (theirs.metadata.src_node_id, theirs.metadata.message_type) == (FAULTY, MessageType.TRAIN)
    reason = _refused_alone(tmp_path, mixed, alone, theirs)
    assert reason.startswith(f"answers the train message sent to node {ROUND_NODES[0]}, not the train message")


def test_a_message_that_was_never_pushed_has_no_reply(tmp_path):
    strategy = round_one_strategy("fedavg", tmp_path, ROUND_NODES)
    before = strategy.global_state
    unpushed = strategy.outbox.message(FAULTY)  # as configure_train built it: no grid gave it an id
    content = RecordDict({"metrics": MetricRecord({"num-examples": 10, "partition-id": 4}), "arrays": ArrayRecord(
        {k: Array(v) for k, v in honest_state(strategy, FAULTY, 100).items()})})
    assert strategy.aggregate_train(1, [Message(content, reply_to=unpushed)]) is None
    assert [r.reason for r in strategy.rejections] == ["its train message of round 1 was never pushed (it has no message id)"]
    assert states_equal(strategy.global_state, before)


@pytest.mark.parametrize("kind", [MessageType.EVALUATE, MessageType.QUERY])
def test_evaluate_and_query_replies_are_not_taken_for_training(tmp_path, kind):
    """Honest training content in a reply to the node's evaluate message or identity query."""
    mixed, alone = _pair(tmp_path)
    if kind == MessageType.EVALUATE:
        twin = round_one_strategy("fedavg", tmp_path / "twin", ROUND_NODES)
        twin.fraction_evaluate = 1.0
        answered = {m.metadata.dst_node_id: m for m in push(twin.configure_evaluate(1, list(ROUND_NODES)))}[FAULTY]
    else:
        answered = identity_query_to(mixed, FAULTY)
    other = readdressed(_reply(mixed, FAULTY, 100), answered, FAULTY)
    assert other.metadata.message_type == kind and "arrays" in other.content
    assert _refused_alone(tmp_path, mixed, alone, other) == f"a {kind!r} reply offered as a 'train' reply"


def _evaluate_reply(sent: Message, accuracy: float, src: int | None = None) -> Message:
    metrics = MetricRecord({"accuracy": accuracy, "loss": 1.0 - accuracy, "num-examples": 20})
    return readdressed(Message(RecordDict({"metrics": metrics}), reply_to=sent), sent, src or sent.metadata.dst_node_id)


def test_evaluate_replies_must_answer_this_rounds_evaluate_message(tmp_path):
    mixed, alone = _pair(tmp_path)
    for strategy in (mixed, alone):
        strategy.fraction_evaluate = 1.0
        push(strategy.configure_evaluate(1, list(ROUND_NODES)))
    honest = {
        name: [_evaluate_reply(sent_message(s, node, MessageType.EVALUATE), 0.5) for node in HONEST]
        for name, s in (("mixed", mixed), ("alone", alone))
    }
    bad = [
        _evaluate_reply(sent_message(mixed, ROUND_NODES[0], MessageType.EVALUATE), 0.99, src=FAULTY),  # another node's
        readdressed(_reply(mixed, FAULTY, 100), sent_message(mixed, FAULTY), FAULTY),  # its train reply
    ]
    assert mixed.aggregate_evaluate(1, [*bad, *honest["mixed"]]) == alone.aggregate_evaluate(1, honest["alone"])
    assert [r.reason.split(",")[0] for r in mixed.rejections] == [
        f"answers the evaluate message sent to node {ROUND_NODES[0]}",
        "a 'train' reply offered as a 'evaluate' reply",
    ]
    assert alone.rejections == []


def test_identity_answers_must_answer_the_nodes_own_query(tmp_path):
    strategy = round_one_strategy("fedavg", tmp_path, ROUND_NODES)
    newcomers = [808, 909]
    queries = {m.metadata.dst_node_id: m for m in push(strategy.identity_queries([*ROUND_NODES, *newcomers]))}
    assert sorted(queries) == newcomers

    def answer(query: Message, src: int, partition: int) -> Message:
        return readdressed(Message(RecordDict({"metrics": MetricRecord({"partition-id": partition})}), reply_to=query), query, src)

    replies = [
        answer(queries[808], 909, 7),  # 909 answers 808's query
        answer(identity_query_to(strategy, 909), 909, 8),  # a query this exchange never sent
        answer(queries[808], 808, 7),  # the honest answer
    ]
    before = dict(strategy.client_of)
    strategy.register_identities(1, replies, [*ROUND_NODES, *newcomers])
    assert strategy.client_of == {**before, 808: 7}
    assert [r.node_id for r in strategy.rejections] == [909, 909]
    assert strategy.rejections[0].reason.startswith("answers the query message sent to node 808, not the query message")
    assert "which is no query message" in strategy.rejections[1].reason


# ------------------------------------------------------------------ item 4: the configured wire contract
@pytest.mark.parametrize("bits", [1, 2, 8, 16, None])
def test_a_reply_encoded_other_than_up_bits_is_refused(tmp_path, bits):
    mixed, alone = _pair(tmp_path, overrides=CODEC_SETTING)
    state = honest_state(mixed, FAULTY, 100)
    reason = _refused_alone(tmp_path, mixed, alone, codec_reply(mixed, FAULTY, state, up_bits=bits))
    key = next(iter(state))
    if bits is None:
        assert reason == f"codec: reply sends {key} dense (32 bits), configured up_bits=4"
    else:
        assert reason == f"codec: reply encoded at {bits} bits ({key}), configured up_bits=4"


def test_a_reply_naming_another_reference_version_is_refused(tmp_path):
    mixed, alone = _pair(tmp_path, overrides=CODEC_SETTING)
    bad = codec_reply(mixed, FAULTY, honest_state(mixed, FAULTY, 100), version_offset=1)
    reason = _refused_alone(tmp_path, mixed, alone, bad)
    assert reason == "codec: reply names reference version 2, the server has version 1 pending for this client"


def test_at_16_bits_a_difference_float16_cannot_hold_travels_dense_and_is_accepted(tmp_path):
    """What a 16-bit client does (``encode_tensor``): such a tensor goes dense, and that is the contract too."""
    strategy = round_one_strategy("fedavg", tmp_path, ROUND_NODES, ("codec.up_bits=16", "codec.down_bits=16"))
    state = honest_state(strategy, FAULTY, 100)
    key = "blocks.0.conv.weight"
    state[key] = state[key].copy()
    state[key].flat[0] += np.float32(1e5)  # beyond float16's 65504
    reply = codec_reply(strategy, FAULTY, state)
    assert reply.content["arrays"][key].stype == "numpy.ndarray" and reply.content["arrays"]["blocks.0.conv.bias"].dtype == "f16"
    strategy.norm_factor = 0.0  # the update is outsized on purpose; this is about its encoding
    strategy.aggregate_train(1, [reply, *_honest(strategy)])
    assert strategy.rejections == []


def test_a_laq_upload_at_another_bit_width_is_refused(tmp_path):
    mixed, alone = _pair(tmp_path, name="laq")
    assert mixed.options.bits == 4
    upload = laq_upload(laq_state(100, mixed.shapes), bits=8)[0]
    reason = _refused_alone(tmp_path, mixed, alone, laq_reply(FAULTY, 4, upload, to=mixed))
    assert reason == f"LAQ update encoded at 8 bits ({next(iter(mixed.shapes))}), configured bits=4"
