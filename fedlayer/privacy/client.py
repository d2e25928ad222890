"""The client's DP step: clip (and, in local mode, noise) the reply's update before the codec encodes it.

The update is the reply's layers minus what this node trained them from:
the value it received this round, else the value it last received (a
method whose layers do not travel every round, FedLAMA, keeps them in
``context.state`` under ``dp-reference`` when the server asks nodes to keep
their model), else the initial model, which the server also starts from.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import Context, MetricRecord, RecordDict

from fedlayer.layers import State, from_arrayrecord, to_arrayrecord
from fedlayer.privacy.mechanism import clipped, is_float, update_norm, with_noise
from fedlayer.privacy.settings import Privacy
from fedlayer.wire.records import ARRAYS, CONFIG, DP_CLIP, DP_WITHIN_CLIP, KEEP_MODEL, METRICS

#: ``context.state`` record: the last value this node received of each tensor.
REFERENCE = "dp-reference"


def training_reference(content: RecordDict, context: Context) -> State:
    """What this node trains each tensor from, as far as it knows before training: the value received
    this round, else the value it last received (the initial model fills in what neither has)."""
    received = from_arrayrecord(content[ARRAYS]) if ARRAYS in content else {}
    stored = context.state.array_records.get(REFERENCE)
    return {**(from_arrayrecord(stored) if stored is not None else {}), **received}


def privatise_reply(
    reply: RecordDict, reference: State, content: RecordDict, context: Context, privacy: Privacy,
    initial: Callable[[], State], rng: Callable[[], np.random.Generator] = np.random.default_rng,
) -> RecordDict:
    """The reply with its update clipped to ``privacy.clip`` (local mode: plus Gaussian noise of
    ``noise_multiplier * clip``, from OS entropy: the server must not be able to replay it).

    ``reference``: ``training_reference``; ``initial``: the initial model. The clip is the one the
    message names (adaptive clipping: the reply then says whether its update was within it), else
    ``privacy.clip``. Keeps the reference for the next round when the server asked the node to keep its model.
    """
    if not privacy.active:
        return reply
    config = content[CONFIG]
    clip = float(config[DP_CLIP]) if DP_CLIP in config else privacy.clip  # adaptive clipping: the server's current clip
    if ARRAYS in reply:
        state = from_arrayrecord(reply[ARRAYS])
        if not state.keys() <= reference.keys():
            reference = {**initial(), **reference}
        norm = update_norm(state, reference)
        state = clipped(state, reference, clip, norm)
        if DP_CLIP in config:
            metrics = reply.metric_records.get(METRICS)
            reply[METRICS] = MetricRecord({**(dict(metrics.items()) if metrics is not None else {}),
                                           DP_WITHIN_CLIP: float(clip is None or norm <= clip)})
        if privacy.local and privacy.noise_std() > 0:  # adaptive clipping is central only: clip is privacy.clip
            noisy = with_noise({k: v - reference[k] for k, v in state.items() if is_float(v)},
                               privacy.noise_std(), rng())
            state = {k: (reference[k] + noisy[k]).astype(v.dtype) if k in noisy else v for k, v in state.items()}
        reply[ARRAYS] = to_arrayrecord(state)
    if bool(content[CONFIG].get(KEEP_MODEL, False)):
        context.state[REFERENCE] = to_arrayrecord(reference)
    return reply
