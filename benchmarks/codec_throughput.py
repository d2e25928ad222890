"""Throughput of the LAQ grid coding against a plain ``np.copy`` of the same input.

For each size and bit width this times, best of ``--repeats``:

* ``pack`` / ``unpack``   bit packing alone (codes <-> bytes);
* ``encode``              quantize_innovation + pack_codes (sender side);
* ``decode``              unpack_codes + dequantize (receiver side);
* ``laq_encode``          one tensor of LAQ's ``lazy_decision``: ``encode_grid`` (the
                          coded Array and Q) plus Q's squared error and innovation,
                          i.e. everything a client pays per tensor.

Throughput is MB/s of float32 *input* (4 bytes per element) for every row, so
the ``x copy`` column compares like with like: ``np.copy`` of the float32
array, measured in the same run.  Usage::

    python benchmarks/codec_throughput.py [--out DIR] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedlayer.wire.bitpack import pack_codes, unpack_codes
from fedlayer.layers import squared_distance
from fedlayer.wire.quantize import QuantizedTensor, dequantize, quantize_innovation
from fedlayer.wire.tensors import encode_grid


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Minimum wall time over ``repeats`` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_size(n: int, bits_list: list[int], repeats: int, seed: int) -> list[dict[str, object]]:
    rng = np.random.default_rng(seed)
    g = rng.standard_normal(n, dtype=np.float32)
    qhat = g + np.float32(0.1) * rng.standard_normal(n, dtype=np.float32)
    mb = g.nbytes / 1e6
    copy_s = best_seconds(lambda: np.copy(g), repeats)
    rows: list[dict[str, object]] = [_row(n, None, "np.copy", copy_s, mb, copy_s)]
    for bits in bits_list:
        qt = quantize_innovation(g, qhat, bits)
        packed = pack_codes(qt.codes, bits)

        def decode(bits: int = bits, packed: bytes = packed, radius: float = qt.radius) -> None:
            codes = unpack_codes(packed, bits, n)
            dequantize(QuantizedTensor(codes, radius, bits), qhat)

        ops: dict[str, Callable[[], object]] = {
            "pack": lambda: pack_codes(qt.codes, bits),
            "unpack": lambda: unpack_codes(packed, bits, n),
            "encode": lambda: pack_codes(quantize_innovation(g, qhat, bits).codes, bits),
            "decode": decode,
            "laq_encode": lambda: _laq_encode(g, qhat, bits),
        }
        for op, fn in ops.items():
            rows.append(_row(n, bits, op, best_seconds(fn, repeats), mb, copy_s))
    return rows


def _laq_encode(g: np.ndarray, qhat: np.ndarray, bits: int) -> tuple[float, float]:
    _, q = encode_grid(g, qhat, bits)
    return squared_distance(q, g), squared_distance(q, qhat)


def _row(
    n: int, bits: int | None, op: str, seconds: float, mb: float, copy_s: float
) -> dict[str, object]:
    return {
        "n": n,
        "bits": bits,
        "op": op,
        "ms": seconds * 1e3,
        "mb_per_s": mb / seconds,
        "ratio_to_copy": copy_s / seconds,
    }


def markdown(rows: list[dict[str, object]]) -> str:
    lines = ["| n | bits | op | ms | MB/s | x copy |", "|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        bits = "-" if r["bits"] is None else r["bits"]
        lines.append(
            f"| {r['n']:,} | {bits} | {r['op']} | {r['ms']:.2f} | "
            f"{r['mb_per_s']:,.0f} | {r['ratio_to_copy']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--bits", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="directory for results.json")
    args = parser.parse_args()

    started = time.perf_counter()
    rows = [r for n in args.sizes for r in bench_size(n, args.bits, args.repeats, args.seed)]
    print(markdown(rows))
    elapsed = time.perf_counter() - started
    print(f"\n{elapsed:.1f} s total; MB/s of float32 input; x copy = np.copy time / op time")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        result = {
            "rows": rows,
            "repeats": args.repeats,
            "seconds": elapsed,
            "numpy": np.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
        }
        (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
