"""The ``privacy`` configuration group as a value, and what it cannot be combined with."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

OFF, CENTRAL, LOCAL = "off", "central", "local"
MODES = (OFF, CENTRAL, LOCAL)


@dataclass(frozen=True)
class Privacy:
    """Client-level DP settings (``privacy.*``).

    ``clip``: L2 bound on one client's update per round, over every float
    tensor it sends (None: no clipping, only for tests: no guarantee then).
    ``noise_multiplier`` z: the Gaussian noise's std is ``z * clip`` on the sum
    of updates (central: added by the server, divided by the expected number of
    carriers like the sum; local: added by each client to its own update).
    ``delta``: the delta epsilon is reported at; ``target_epsilon``: the run
    stops before a round that would spend more (None: never).
    """

    mode: str = OFF
    clip: float | None = 1.0
    noise_multiplier: float = 1.0
    delta: float = 1e-5
    target_epsilon: float | None = None
    #: adaptive clipping (Andrew et al. 2021, https://arxiv.org/abs/1905.03871): the clip follows
    #: the ``target_quantile`` of the update norms, learning rate ``clip_lr``, from a count noised by
    #: ``clip_count_stddev`` (part of the same privacy budget: the updates get less noise, see ``update_noise_multiplier``)
    adaptive_clip: bool = False
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    clip_count_stddev: float = 5.0

    @property
    def active(self) -> bool:
        return self.mode != OFF

    @property
    def central(self) -> bool:
        return self.mode == CENTRAL

    @property
    def local(self) -> bool:
        return self.mode == LOCAL

    def noise_std(self) -> float:
        """Std of the Gaussian noise on one sum of clipped updates (0 without clipping or noise)."""
        return 0.0 if self.clip is None else self.noise_multiplier * self.clip

    def accounted_noise_multiplier(self) -> float:
        """The noise multiplier the accountant composes: 0 (infinite epsilon) without clipping, where noise bounds nothing."""
        return 0.0 if self.clip is None else self.noise_multiplier

    def update_noise_multiplier(self) -> float:
        """The updates' share of ``noise_multiplier`` z: z itself, or with adaptive clipping
        ``(z^-2 - (2 clip_count_stddev)^-2)^-1/2``, so updates and the noised count together
        spend what one Gaussian mechanism of z does (Andrew et al. 2021, Theorem 1)."""
        z = self.noise_multiplier
        if not self.adaptive_clip or z == 0:
            return z
        return (z ** -2 - (2 * self.clip_count_stddev) ** -2) ** -0.5

    @classmethod
    def from_config(cls, section: Any) -> Privacy:
        """From the validated ``privacy`` config section (absent: off)."""
        if section is None:
            return cls()
        return cls(
            mode=OFF if section.mode is False else str(section.mode),  # YAML 1.1 reads a bare off as false
            clip=None if section.clip is None else float(section.clip),
            noise_multiplier=float(section.noise_multiplier),
            delta=float(section.delta),
            target_epsilon=None if section.target_epsilon is None else float(section.target_epsilon),
            adaptive_clip=bool(section.get("adaptive_clip", False)),
            target_quantile=float(section.get("target_quantile", 0.5)),
            clip_lr=float(section.get("clip_lr", 0.2)),
            clip_count_stddev=float(section.get("clip_count_stddev", 5.0)),
        )


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


#: (field under ``privacy``, check, problem) for ``fedlayer.config.validate_config``.
FIELD_RULES: list[tuple[str, Any, str]] = [
    ("mode", lambda v: v is False or v in MODES, f"must be one of {list(MODES)}"),
    ("clip", lambda v: v is None or _positive_number(v), "must be null (no clipping: tests only) or > 0"),
    ("noise_multiplier", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0, "must be >= 0"),
    ("delta", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1, "must be in (0, 1)"),
    ("target_epsilon", lambda v: v is None or _positive_number(v), "must be null or > 0"),
    ("adaptive_clip", lambda v: isinstance(v, bool), "must be true or false"),
    ("target_quantile", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1, "must be in (0, 1)"),
    ("clip_lr", lambda v: _positive_number(v), "must be > 0"),
    ("clip_count_stddev", lambda v: _positive_number(v), "must be > 0"),
]


def cross_field_problem(privacy: Privacy) -> tuple[str, str] | None:
    """(field under ``privacy``, problem) for settings that are each valid but do not fit together."""
    if privacy.adaptive_clip and privacy.clip is None:
        return "clip", "adaptive_clip needs an initial clip, got null"
    if privacy.adaptive_clip and privacy.local:
        return "adaptive_clip", "applies to mode=central only (the server learns the clip from a noised count)"
    if privacy.adaptive_clip and privacy.noise_multiplier > 0 and not 2 * privacy.clip_count_stddev > privacy.noise_multiplier:
        return "clip_count_stddev", (
            f"must be > noise_multiplier / 2 = {privacy.noise_multiplier / 2:g} with adaptive_clip "
            f"(the count's noise is part of the budget), got {privacy.clip_count_stddev:g}"
        )
    return None


def refusal(privacy: Privacy, method: str, settings: dict[str, Any]) -> tuple[str, str] | None:
    """(config field, reason) when ``method`` with these ``settings`` cannot be private as built; None when it can.

    ``settings`` holds ``aggregation_rule`` and the method's own arguments.
    Each reason is in docs/privacy.md, "Refused combinations".
    """
    if not privacy.active:
        return None
    if method == "pfedla":
        return "strategy.name", (
            "pFedLA keeps a personalised model per client, each a function of that client's updates alone; "
            "noise sized for one average does not hide a client in its own model"
        )
    if method == "laq":
        return "strategy.name", (
            "LAQ reuses a client's stale update and skips uploads by a test on the client's own gradients: "
            "the skip pattern leaks and a reused update is released again without fresh noise"
        )
    if method == "local":
        return "strategy.name", "local-only training releases no model; there is nothing to make private"
    if privacy.central and settings.get("aggregation_rule", "mean") != "mean":
        return "aggregation.rule", (
            f"{settings['aggregation_rule']} has no bounded sensitivity to one client's update; "
            "DP-FedAvg's noise is sized for the mean (use aggregation.rule=mean)"
        )
    if method == "fll" and settings.get("stage_rule") == "plateau":
        return "strategy.stage_rule", (
            "the plateau rule advances stages on the clients' unnoised validation scores, "
            "so the released model's structure depends on them (use a fixed stage schedule)"
        )
    return None
