"""The codec's levers as one typed value (``codec.*`` beyond the widths), each off by default."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fedlayer.errors import require
from fedlayer.wire.levers import ENTROPY, MAX_RANK, TOPK_WIDTHS, Encoding

#: Widths a direction may use together with a lever (16 is not offered: float16 may overflow).
LEVER_WIDTHS = TOPK_WIDTHS
#: (field, check, problem) of each lever, for ``codec.<field>``.
CODEC_RULES: list[tuple[str, Callable[[Any], bool], str]] = [
    ("block", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
     "must be an integer >= 0 (values per 1-bit scale; 0: one per tensor)"),
    ("topk", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1,
     "must be in (0, 1] (the share of each difference sent; 1: all)"),
    ("down_topk", lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1),
     "must be null (codec.topk) or in (0, 1] (the share of each download's difference sent)"),
    ("entropy", lambda v: v in ENTROPY, f"must be one of {list(ENTROPY)}"),
    ("budget_bits", lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and 1 <= v <= 8),
     "must be null or in [1, 8] (value bits per parameter)"),
    ("shared_downlink", lambda v: isinstance(v, bool), "must be true or false"),
    ("step", lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 16),
     "must be null (the LAQ grid) or in (0, 16] (a zero-level grid, its step this many times the difference's RMS)"),
    ("rank", lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_RANK,
     f"must be an integer in [0, {MAX_RANK}] (matrices travel as factors of this rank; 0: off)"),
]


@dataclass(frozen=True)
class CodecOptions:
    """``codec.block``, ``codec.topk``, ``codec.down_topk``, ``codec.entropy``, ``codec.budget_bits``, ``codec.shared_downlink``, ``codec.step``, ``codec.rank``.

    The first four apply to every direction that is coded (its width below
    32, or top-k on); ``shared_downlink``: a download is encoded once per
    reference and sent to every client holding that reference.
    """

    block: int = 0
    topk: float = 1.0
    down_topk: float | None = None
    entropy: str = "none"
    budget_bits: float | None = None
    shared_downlink: bool = False
    step: float | None = None
    rank: int = 0

    @classmethod
    def from_config(cls, codec: Any) -> CodecOptions:
        """From the ``codec`` section (keys it lacks, as in runs saved before them, are off)."""
        get = codec.get if codec is not None else (lambda _key, default=None: default)
        budget = get("budget_bits", None)
        down_topk = get("down_topk", None)
        step = get("step", None)
        return cls(int(get("block", 0)), float(get("topk", 1.0)), None if down_topk is None else float(down_topk),
                   str(get("entropy", "none")), None if budget is None else float(budget), bool(get("shared_downlink", False)),
                   None if step is None else float(step), int(get("rank", 0)))

    @property
    def levers_on(self) -> bool:
        return (self.block != 0 or self.topk < 1.0 or (self.down_topk is not None and self.down_topk < 1.0)
                or self.entropy != "none" or self.budget_bits is not None or self.step is not None or self.rank != 0)

    def combination_problem(self) -> tuple[str, str] | None:
        """The field (``step`` or ``rank``) that does not combine with the other levers, and why; or None."""
        topk = self.topk < 1.0 or (self.down_topk is not None and self.down_topk < 1.0)
        for field, on, kind in (("step", self.step is not None, "its kept values use the LAQ grid"),
                                ("rank", self.rank != 0, "a tensor travels either as factors or as kept values")):
            if not on:
                continue
            if self.budget_bits is not None:
                return field, "does not combine with codec.budget_bits (a budget weighs the LAQ grid's widths)"
            if topk:
                return field, f"does not combine with top-k (codec.topk, codec.down_topk: {kind})"
        return None

    def check(self, up_bits: int, down_bits: int) -> None:
        """``ParameterError`` (argument ``codec_options``) for the first lever out of range or not combining.

        ``fedlayer.config`` checks the same per field at start (``CODEC_RULES``).
        """
        for field, check, problem in CODEC_RULES:
            value = getattr(self, field)
            require(check(value), "codec_options", f"codec.{field} {problem}", value)
        if (problem := self.combination_problem()) is not None:
            field, why = problem
            require(False, "codec_options", f"codec.{field} {why}", getattr(self, field))
        if self.levers_on:
            for name, bits in (("up_bits", up_bits), ("down_bits", down_bits)):
                require(bits in LEVER_WIDTHS, name, f"must be one of {list(LEVER_WIDTHS)} with codec levers on", bits)

    def encoding(self, bits: int, down: bool = False) -> Encoding:
        """How a direction configured at ``bits`` encodes (``down``: the downlink, whose top-k is ``down_topk``)."""
        topk = self.down_topk if down and self.down_topk is not None else self.topk
        if bits == 32 and topk >= 1.0:
            return Encoding(bits)
        return Encoding(bits, self.block, topk, self.entropy, self.budget_bits, self.step, self.rank)
