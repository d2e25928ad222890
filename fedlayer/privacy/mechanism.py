"""DP-FedAvg's two steps on states: clip one client's update, form a noised fixed-denominator mean.

An update is a client's value minus the reference it trained from (what it
was sent), over every float tensor it returns; integer tensors (BatchNorm's
``num_batches_tracked``) carry no data and are left out. Clipping scales the
whole update so its L2 norm is at most ``clip`` (McMahan et al. 2018,
https://arxiv.org/abs/1710.06963, "flat clipping").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

State = dict[str, np.ndarray]


def is_float(value: np.ndarray) -> bool:
    return np.issubdtype(np.asarray(value).dtype, np.floating)


def update_norm(state: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """L2 norm, in float64, of ``state - reference`` over the float tensors of ``state``."""
    total = 0.0
    for key, value in state.items():
        if is_float(value):
            diff = np.asarray(value, dtype=np.float64).ravel() - np.asarray(reference[key], dtype=np.float64).ravel()
            total += float(np.dot(diff, diff))
    return math.sqrt(total)


def clip_scale(norm: float, clip: float | None) -> float:
    """The factor that brings an update of ``norm`` within ``clip`` (1.0: none needed, or no clipping)."""
    if clip is None or norm <= clip:
        return 1.0
    return clip / norm


def clipped(
    state: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], clip: float | None, norm: float | None = None
) -> State:
    """``state`` with its update against ``reference`` clipped to norm ``clip``; tensors stay as they are
    (the same arrays) when no clipping is needed, so a run whose updates are all within ``clip`` is unchanged.
    ``norm``: the update's norm when the caller has it."""
    scale = clip_scale(update_norm(state, reference) if norm is None else norm, clip)
    if scale == 1.0:
        return dict(state)
    out: State = {}
    for key, value in state.items():
        if is_float(value):
            ref = np.asarray(reference[key], dtype=np.float64)
            out[key] = (ref + (np.asarray(value, dtype=np.float64) - ref) * scale).astype(value.dtype)
        else:
            out[key] = value
    return out


def with_noise(state: Mapping[str, np.ndarray], std: float, rng: np.random.Generator) -> State:
    """``state`` plus Gaussian noise of ``std`` on every float tensor (drawn in key order); unchanged when ``std`` is 0."""
    if std <= 0:
        return dict(state)
    return {
        key: (np.asarray(value, dtype=np.float64) + rng.normal(0.0, std, np.shape(value))).astype(value.dtype)
        if is_float(value) else value
        for key, value in state.items()
    }


def fixed_denominator_mean(
    values: Sequence[np.ndarray], base: np.ndarray, denominator: float, std: float, rng: np.random.Generator
) -> np.ndarray:
    """DP-FedAvg's estimator of one tensor: ``base + sum_i (value_i - base) / denominator + N(0, std^2)``.

    ``values`` are the carriers' (clipped) values, each trained from ``base``;
    ``denominator`` is fixed in advance (the expected number of carriers), not
    the realised ``len(values)``, so a tensor few clients carried is not
    averaged over few with noise sized for many. Computed as
    ``sum_i value_i / denominator + (1 - n / denominator) base`` in the
    tensor's dtype and reply order; with every carrier present
    (``n == denominator``) and no noise that is, bit for bit, the
    equal-weight mean ``weighted_layer_average`` forms.
    """
    dtype = base.dtype
    weight = 1.0 / denominator
    acc: np.ndarray | None = None
    for value in values:
        term = value * weight
        acc = term if acc is None else acc + term
    missing = 1.0 - len(values) / denominator
    if acc is None:
        acc = base * missing
    elif missing != 0.0:
        acc = acc + base * missing
    if std > 0:
        acc = acc + rng.normal(0.0, std, acc.shape)
    return np.asarray(acc).astype(dtype, copy=False)
