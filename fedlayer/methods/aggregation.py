"""How replies become one layer: the weighted mean, robust rules, and the update-norm guard.

Every strategy that averages layers uses ``aggregate_layers`` with its
configured rule (``aggregation.rule``):

- ``mean``: the example-weighted mean (FedAvg);
- ``median``: the coordinate-wise median (Yin et al. 2018, https://arxiv.org/abs/1803.01498);
- ``trimmed_mean``: per coordinate, drop the ``floor(trim * n)`` largest and
  smallest values, average the rest (same paper; Flower's ``trim_mean``, which
  FedTrimmedAvg uses; ``trim`` < 0.5, checked at start, always leaves a value).

The robust rules are unweighted: a client claiming many examples must not
buy more influence. ``oversized_updates`` is the guard every strategy runs
before any rule: a reply whose update of some tensor is far larger than the
round's median update of that tensor is refused. A tensor only one reply
carries has no median to compare with: ``unexpected_updates`` bounds its
update by what the strategy expects of that tensor instead, and
``unexpected_change`` bounds how far the merged model moves each tensor.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean

from fedlayer.layers import ModelLayers, State
from fedlayer.methods.replies import TrainReply

RULES = ("mean", "median", "trimmed_mean")
#: Entries per block of ``squared_norm`` (512 KiB of float64)
_BLOCK = 1 << 16


def weighted_layer_average(
    replies: Sequence[TrainReply], layers: ModelLayers, names: Iterable[str]
) -> State:
    """Average each named layer over the replies that carry it.

    Weights are ``num_examples`` normalised over the replies holding the layer.
    The arithmetic (``sum_i value_i * (w_i / sum w)`` accumulated in reply
    order, in the tensor's dtype) matches Flower's ``aggregate_arrayrecords``,
    so FedAvg here gives the same model as Flower's FedAvg. Integer tensors
    (BatchNorm's ``num_batches_tracked``) are averaged and rounded back.
    A layer no reply carries is absent from the result (the caller keeps the old one).
    """
    out: State = {}
    for name in names:
        holders = [r for r in replies if name in r.layer_names]
        if not holders:
            continue
        total = float(sum(r.num_examples for r in holders))
        for key in layers[name].keys:
            dtype = holders[0].state[key].dtype
            floating = np.issubdtype(dtype, np.floating)
            acc: np.ndarray | None = None
            for reply in holders:
                value = reply.state[key] if floating else reply.state[key].astype(np.float64)
                term = value * (reply.num_examples / total)
                acc = term if acc is None else acc + term
            assert acc is not None
            out[key] = acc if floating else np.rint(acc).astype(dtype)
    return out


def coordinate_median(values: np.ndarray) -> np.ndarray:
    """The median over axis 0 (the replies)."""
    return np.median(values, axis=0)


def robust_layer_average(
    replies: Sequence[TrainReply], layers: ModelLayers, names: Iterable[str], reduce: Callable[[np.ndarray], np.ndarray]
) -> State:
    """Each named layer reduced coordinate-wise (``reduce`` over axis 0) over the replies carrying it."""
    out: State = {}
    for name in names:
        holders = [r for r in replies if name in r.layer_names]
        if not holders:
            continue
        for key in layers[name].keys:
            dtype = holders[0].state[key].dtype
            stacked = np.stack([r.state[key].astype(np.float64) for r in holders])
            reduced = reduce(stacked)
            out[key] = reduced.astype(dtype) if np.issubdtype(dtype, np.floating) else np.rint(reduced).astype(dtype)
    return out


def aggregate_layers(
    replies: Sequence[TrainReply], layers: ModelLayers, names: Iterable[str], rule: str = "mean", trim: float = 0.1
) -> State:
    """The named layers aggregated over the replies by ``rule`` (see the module docstring)."""
    if rule == "mean":
        return weighted_layer_average(replies, layers, names)
    if rule == "median":
        return robust_layer_average(replies, layers, names, coordinate_median)
    if rule == "trimmed_mean":
        return robust_layer_average(replies, layers, names, lambda values: trim_mean(values, trim))
    raise ValueError(f"unknown aggregation rule {rule!r}; choose from {list(RULES)}")


def update_norms(reply: TrainReply, reference: Callable[[int, str], np.ndarray | None]) -> dict[str, float]:
    """Per float tensor of ``reply``, the L2 norm of its value minus what the node was sent.

    ``reference(node_id, key)`` is the value the node was sent (None: no
    reference, the key is skipped). Computed in float64, so values near the
    float32 limit give a finite (huge) norm rather than an overflow.
    """
    norms: dict[str, float] = {}
    for key, value in reply.state.items():
        sent = reference(reply.node_id, key)
        if sent is None or not np.issubdtype(value.dtype, np.floating):
            continue
        norms[key] = math.sqrt(squared_norm(value, sent))
    return norms


def squared_norm(value: np.ndarray, minus: np.ndarray | None = None) -> float:
    """``||value - minus||^2`` (``||value||^2`` without ``minus``), the difference and squares in float64.

    In blocks of ``_BLOCK`` entries, summed with ``np.einsum``: no float64 copy of
    a whole tensor, and not ``np.dot``, whose multi-threaded BLAS spin-waits when
    the clients' training holds every core (2.6x slower for the CNN's largest
    tensor with both cores busy, where the guard runs in simulation).
    """
    flat = np.asarray(value).reshape(-1)
    other = None if minus is None else np.asarray(minus).reshape(-1)
    block = np.empty(min(flat.size, _BLOCK), dtype=np.float64)
    total = 0.0
    for start in range(0, flat.size, _BLOCK):
        part = block[: min(_BLOCK, flat.size - start)]
        if other is None:
            np.copyto(part, flat[start : start + _BLOCK])
        else:
            np.subtract(flat[start : start + _BLOCK], other[start : start + _BLOCK], out=part, dtype=np.float64)
        total += float(np.einsum("i,i->", part, part))
    return total


def lower_median(values: list[float]) -> float:
    """The ceil(n/2)-th smallest value: with n even, the lower of the two middle values."""
    return float(sorted(values)[(len(values) - 1) // 2])


def oversized_updates(norms: dict[int, dict[str, float]], factor: float) -> dict[int, str]:
    """Nodes whose update norm of some tensor exceeds ``factor`` x that tensor's median over the nodes.

    ``norms``: node id -> tensor key -> update norm (``update_norms``).
    Returns node id -> reason. The median is the lower median over the nodes
    carrying the tensor, so it is an honest norm whenever oversized updates are
    at most half of the tensor's carriers (an even split included); a median of
    0 refuses any change. A refused node leaves every tensor's median and the
    medians are taken again, so an attacker caught on one tensor no longer
    shields another on a tensor few honest nodes carry (FedLP's kept layers).
    """
    refused: dict[int, str] = {}
    while True:
        by_layer: dict[str, list[float]] = {}
        for node, layer_norms in norms.items():
            if node not in refused:
                for name, value in layer_norms.items():
                    by_layer.setdefault(name, []).append(value)
        medians = {name: lower_median(values) for name, values in by_layer.items()}
        found = {}
        for node, layer_norms in norms.items():
            if node in refused:
                continue
            for name, value in layer_norms.items():
                if value > factor * medians[name]:
                    found[node] = (
                        f"update of {name!r} has norm {value:.3g}, above {factor:g} x the round's median {medians[name]:.3g}"
                    )
                    break
        if not found:
            return refused
        refused |= found


def l2_norm(value: np.ndarray) -> float:
    """The L2 norm of ``value``, in float64 (finite for values near the float32 limit)."""
    return math.sqrt(squared_norm(value))


def rms(state: Mapping[str, np.ndarray]) -> float:
    """Root mean square of the float entries of ``state``: the typical size of one value."""
    floats = [v for v in state.values() if np.issubdtype(v.dtype, np.floating)]
    count = sum(v.size for v in floats)
    return math.sqrt(sum(l2_norm(v) ** 2 for v in floats) / count) if count else 0.0


def tensor_scale(value: np.ndarray, model_rms: float) -> float:
    """How large a tensor is: its norm, at least that of a tensor of its size at the model's RMS
    (so a tensor that starts at zero, a BatchNorm bias, still has a scale)."""
    return max(l2_norm(value), model_rms * math.sqrt(value.size))


def unexpected_updates(
    norms: dict[int, dict[str, float]], expected: Callable[[int, str], float], factor: float
) -> dict[int, str]:
    """Nodes whose update of a tensor that no other node carries is above ``factor`` x ``expected(node, key)``.

    ``norms`` as for ``oversized_updates``. With one carrier there is no
    median to compare with (one reply in the round, or a layer only one node
    kept or holds), so the strategy says what an update of that tensor may
    measure. Returns node id -> reason.
    """
    carriers = Counter(key for layer_norms in norms.values() for key in layer_norms)
    refused: dict[int, str] = {}
    for node, layer_norms in norms.items():
        for key, value in layer_norms.items():
            if carriers[key] == 1 and not value <= factor * (scale := expected(node, key)):
                refused[node] = (
                    f"update of {key!r} has norm {value:.3g}, above {factor:g} x its expected size {scale:.3g} "
                    "(no other reply carries it)"
                )
                break
    return refused


def unexpected_change(current: Mapping[str, np.ndarray], merged: Mapping[str, np.ndarray], factor: float) -> str | None:
    """Why ``merged`` must not replace ``current``: a float tensor moved by more than ``factor`` x its
    ``tensor_scale`` (None: every tensor stays within it). Tensors ``merged`` shares with ``current`` are skipped."""
    model_rms = rms(current)
    for key, new in merged.items():
        old = current[key]
        if new is old or not np.issubdtype(old.dtype, np.floating):
            continue
        change = math.sqrt(squared_norm(new, old))
        if not change <= factor * (scale := tensor_scale(old, model_rms)):
            return f"it moves {key!r} by {change:.3g}, above {factor:g} x the tensor's size {scale:.3g}"
    return None
