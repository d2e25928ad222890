"""The privacy a run has spent, with Google's dp-accounting RDP accountant.

A round is one ``DpEvent``: the strategy says which (``LayerwiseStrategy.privacy_event``).
Central DP with a cohort drawn at random is a Poisson-sampled Gaussian
mechanism with rate q = cohort / clients (the cohort is drawn without
replacement at a fixed size; the Poisson accountant is the usual
approximation, as in McMahan et al. 2018 and TensorFlow Privacy). Local DP
gets no amplification (the server sees who took part): every round is a
plain Gaussian mechanism. The events are kept as (q, noise multiplier,
count) rows, so the state checkpoints as plain data and a resumed run
rebuilds the same accountant.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import dp_accounting


def round_event(sampling_rate: float, noise_multiplier: float) -> dp_accounting.DpEvent:
    """One round: a Gaussian mechanism of ``noise_multiplier``, Poisson-sampled at ``sampling_rate`` (1: no sampling)."""
    import dp_accounting  # 1.8 s of imports (scipy, mpmath): only runs with privacy on pay them

    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    return gaussian if sampling_rate >= 1.0 else dp_accounting.PoissonSampledDpEvent(sampling_rate, gaussian)


def calibrate_noise_multiplier(
    target_epsilon: float, delta: float, sampling_rate: float, events: int, per_event_scale: float = 1.0, decimals: int = 3
) -> float:
    """The smallest noise multiplier z (rounded up to ``decimals``) whose ``events`` mechanisms spend at most
    ``target_epsilon`` at ``delta``; each event is a Gaussian of z / ``per_event_scale`` sampled at ``sampling_rate``.

    FedAvg: ``events`` = rounds, scale 1. FedLAMA (a block charged once, ``privacy_event``):
    ``events`` = rounds / phi, scale sqrt(phi). Bisection on the accountant this module uses.
    """
    if target_epsilon <= 0 or not 0 < delta < 1 or not 0 < sampling_rate <= 1 or events < 1 or per_event_scale <= 0:
        raise ValueError("calibrate_noise_multiplier: need target_epsilon > 0, 0 < delta < 1, 0 < sampling_rate <= 1, events >= 1")

    def spent(z: float) -> float:
        accountant = PrivacyAccountant()
        accountant.compose(sampling_rate, z / per_event_scale, events)
        return accountant.epsilon(delta)

    step = 10.0**-decimals
    low, high = 0.0, 1.0  # spent(high) <= target_epsilon < spent(low) once the loop below ends
    while spent(high) > target_epsilon:
        low, high = high, 2 * high
    while high - low > step / 4:
        middle = (low + high) / 2
        low, high = (middle, high) if spent(middle) > target_epsilon else (low, middle)
    z = round(math.ceil(high / step - 1e-9) * step, decimals)
    return z if spent(z) <= target_epsilon else round(z + step, decimals)


class PrivacyAccountant:
    """The composed rounds of one run; ``epsilon(delta)`` is what they spent.

    ``events``: (sampling rate, noise multiplier, count) rows, oldest first.
    A noise multiplier of 0 spends infinite epsilon.
    """

    def __init__(self) -> None:
        self.events: list[tuple[float, float, int]] = []

    def compose(self, sampling_rate: float, noise_multiplier: float, count: int = 1) -> None:
        """Add ``count`` rounds of one kind (merged into the last row when it is the same kind)."""
        row = (float(sampling_rate), float(noise_multiplier))
        if self.events and self.events[-1][:2] == row:
            self.events[-1] = (*row, self.events[-1][2] + int(count))
        else:
            self.events.append((*row, int(count)))

    def epsilon(self, delta: float, extra: tuple[float, float, int] | None = None) -> float:
        """Epsilon at ``delta`` of the composed rounds (and ``extra``, a round not composed yet)."""
        rows = self.events + ([extra] if extra is not None else [])
        if any(z <= 0 for _, z, _ in rows):
            return math.inf
        from dp_accounting.rdp import RdpAccountant

        accountant = RdpAccountant()
        absl = logging.getLogger("absl")
        level = absl.level
        absl.setLevel(logging.ERROR)  # it warns (when composing) for each RDP order it leaves out; the bound stays valid
        try:
            for q, z, count in rows:
                accountant.compose(round_event(q, z), count)
            return float(accountant.get_epsilon(delta))
        finally:
            absl.setLevel(level)

    def state_dict(self) -> dict[str, Any]:
        return {"events": [list(row) for row in self.events]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.events = [(float(q), float(z), int(c)) for q, z, c in state["events"]]
