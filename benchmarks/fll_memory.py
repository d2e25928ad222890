"""Peak training memory of layer-wise training (FLL) against end-to-end training.

Two commands::

    python -m benchmarks.fll_memory stages [--models resnet20 cnn] [--datasets mnist5k animal10k]
    python -m benchmarks.fll_memory suite benchmarks/suites/fll.yaml --out bench-out/fll

``stages`` measures one local training step of every stage directly, with the
client's own code (``fedlayer.methods.fll.train_stage`` on one batch of a
client's data, measured by ``fedlayer.memory``), next to one
end-to-end step of the same model, batch and objective (a single stage
holding every block is end-to-end training). On CUDA the allocator's peak
(``torch.cuda.max_memory_allocated``) is reported too.

``suite`` runs a harness suite (FedAvg and FLL variants side by side, see
``benchmarks/harness.py``) and writes ``memory.md``: each run's final
accuracy (linear-probe accuracy for the contrastive objective), its peak
training memory (the largest ``peak-train-memory-bytes`` any client reported
in the run), the end-to-end peak of the same model/batch/objective measured
as in ``stages`` (FedAvg's client does not measure itself), their ratio, and
bytes against the FedAvg run of the same setting.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.harness import load_suite, run_suite
from fedlayer.config import compose_config
from fedlayer.device import resolve_device
from fedlayer.methods.client_half import ClientRuntime
from fedlayer.methods.fll import train_stage
from fedlayer.models.staged import STAGE_HEADS, StagedModel, StageSpec
from fedlayer.server.rundir import RunDirectory
from fedlayer.workload import build_configured_model, load_workload

MB = 1e6


def step_peak(
    model_name: str, dataset: str, blocks_per_stage: int, stage: int, *, objective: str = "supervised",
    p_drop: float = 0.0, batch_size: int = 32, head_pool: int = 2, device: str = "cpu", temperature: float = 0.5,
    checkpoint: bool = False, head: str = "linear",
) -> dict[str, float]:
    """Peak memory of the first local step of ``stage`` (as a client measures it), and
    the step's floating-point operations (``flops``, counted by ``torch.utils.flop_counter``)."""
    cfg = compose_config([f"model={model_name}", f"dataset={dataset}", f"train.batch_size={batch_size}", "train.local_steps=1"])
    runtime = ClientRuntime(cfg=cfg, partition_id=0, num_partitions=5, data_path=None, device=resolve_device(device))
    model = runtime.new_model()
    net = StagedModel(model, StageSpec(len(model.blocks), blocks_per_stage), head_pool, seed=0, checkpoint=checkpoint, head=head)
    with FlopCounterMode(display=False) as counter:
        metrics = train_stage(net, stage, runtime, seed=0, p_drop=p_drop, objective=objective, temperature=temperature)
    return {**metrics, "flops": float(counter.get_total_flops())}


def end_to_end_peak(model_name: str, dataset: str, **kwargs: Any) -> dict[str, float]:
    """One end-to-end step (what FedAvg's client does): a single stage with every block, nothing recomputed."""
    return step_peak(model_name, dataset, 10**6, 0, **{**kwargs, "checkpoint": False})


def stages_table(
    models: list[str], datasets: list[str], objectives: list[str], batch_size: int, device: str, head: str = "linear"
) -> tuple[str, list[dict[str, Any]]]:
    """Per-stage peaks (activations kept, and checkpointed) and step FLOPs against end-to-end, as Markdown and rows."""
    rows: list[dict[str, Any]] = []
    lines = [
        f"# FLL peak training memory and FLOPs per stage (batch {batch_size}, device {device}, {head} stage heads)",
        "",
        "'kept': every activation kept for backward; 'checkpointed': `strategy.checkpoint_activations=true`"
        " (the default). FLOPs: one local step, forward + backward + the frozen prefix's forward.",
        "",
        "| model | dataset | objective | stage (= block) | peak MB kept | peak MB checkpointed | end-to-end MB | reduction "
        "| step MFLOPs | of end-to-end step | CUDA peak MB | CUDA end-to-end MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model_name in models:
        for dataset in datasets:
            for objective in objectives:
                options = {"objective": objective, "batch_size": batch_size, "device": device, "head": head}
                e2e = end_to_end_peak(model_name, dataset, **options)
                cfg = compose_config([f"model={model_name}", f"dataset={dataset}"])
                blocks = len(build_configured_model(cfg, load_workload(cfg, 5).client_data(0)[0]).blocks)
                setting = []
                for stage in range(blocks):
                    kept = step_peak(model_name, dataset, 1, stage, **options)
                    checkpointed = step_peak(model_name, dataset, 1, stage, checkpoint=True, **options)
                    row = {
                        "model": model_name, "dataset": dataset, "objective": objective, "stage": stage, "head": head,
                        "peak_kept": kept["peak-train-memory-bytes"], "peak": checkpointed["peak-train-memory-bytes"],
                        "end_to_end": e2e["peak-train-memory-bytes"], "flops": checkpointed["flops"],
                        "flops_kept": kept["flops"], "end_to_end_flops": e2e["flops"],
                        "cuda_peak": checkpointed.get("cuda-peak-memory-bytes"), "cuda_end_to_end": e2e.get("cuda-peak-memory-bytes"),
                    }
                    setting.append(row)
                    cuda = (
                        f"{row['cuda_peak'] / MB:.2f} | {row['cuda_end_to_end'] / MB:.2f}" if row["cuda_peak"] is not None else "- | -"
                    )
                    lines.append(
                        f"| {model_name} | {dataset} | {objective} | {stage} | {row['peak_kept'] / MB:.2f} | {row['peak'] / MB:.2f} | "
                        f"{row['end_to_end'] / MB:.2f} | {row['end_to_end'] / row['peak']:.1f}x | {row['flops'] / 1e6:.1f} | "
                        f"{row['flops'] / row['end_to_end_flops']:.2f} | {cuda} |"
                    )
                rows.extend(setting)
                kept_worst = max(r["peak_kept"] for r in setting)
                worst = max(r["peak"] for r in setting)
                e2e_peak = e2e["peak-train-memory-bytes"]
                lines.append(
                    f"| {model_name} | {dataset} | {objective} | **run peak (max over stages)** | {kept_worst / MB:.2f} "
                    f"({e2e_peak / kept_worst:.1f}x) | {worst / MB:.2f} | {e2e_peak / MB:.2f} | **{e2e_peak / worst:.1f}x** | "
                    f"{e2e['flops'] / 1e6:.1f} (end-to-end) | 1.00 | | |"
                )
    return "\n".join(lines) + "\n", rows


def run_peak(run_dir: str) -> float | None:
    """The largest client peak training memory recorded in a run."""
    peaks = [r.get("strategy", {}).get("peak-train-memory-bytes") for r in RunDirectory(Path(run_dir)).read_metrics()]
    peaks = [p for p in peaks if p is not None]
    return max(peaks) if peaks else None


def measured_stage_step_flops(model_name: str, dataset: str, params: dict[str, Any], batch_size: int) -> list[float]:
    """FLOPs of one local step of each stage of an FLL run with ``params`` (its strategy parameters)."""
    keys = ("objective", "stage_head", "checkpoint_activations", "head_pool", "blocks_per_stage")
    return _measured_stage_step_flops(model_name, dataset, tuple((key, params.get(key)) for key in keys), batch_size)


@functools.cache
def _measured_stage_step_flops(model_name: str, dataset: str, params_items: tuple, batch_size: int) -> list[float]:
    params = {key: value for key, value in params_items if value is not None}
    options = {
        "objective": params.get("objective", "supervised"), "batch_size": batch_size,
        "head": params.get("stage_head", "linear"), "checkpoint": bool(params.get("checkpoint_activations", True)),
        "head_pool": int(params.get("head_pool", 2)),
    }
    cfg = compose_config([f"model={model_name}", f"dataset={dataset}"])
    blocks = len(build_configured_model(cfg, load_workload(cfg, 5).client_data(0)[0]).blocks)
    spec = StageSpec(blocks, int(params.get("blocks_per_stage", 1)))
    return [step_peak(model_name, dataset, spec.blocks_per_stage, stage, **options)["flops"] for stage in range(spec.num_stages)]


def client_flops(run: dict[str, Any], step_flops: list[float]) -> float:
    """Training FLOPs of all clients over a run: per round, replies x mean local steps x
    the step FLOPs of the round's stage (``step_flops[0]`` for one-stage, end-to-end runs)."""
    total = 0.0
    for record in RunDirectory(Path(run["run_dir"])).read_metrics():
        if "round" not in record or "train" not in record:
            continue
        stage = int(record.get("strategy", {}).get("stage", 0))
        total += record["replies"] * record["train"].get("local-steps", 0.0) * step_flops[stage]
    return total


def memory_report(results: list[dict[str, Any]], batch_size: int, title: str) -> str:
    """Markdown: accuracy, memory and bytes of each run against FedAvg / end-to-end."""
    lines = [
        f"# {title}",
        "",
        "Peak training memory: bytes of live tensors during a client's training step (parameters,"
        " gradients, optimiser state, activations kept for backward, temporaries), measured on the CPU by"
        " `fedlayer.memory`. 'end-to-end MB' is one end-to-end step of the same model, batch and"
        " objective measured the same way. 'acc' is central test accuracy (supervised) or linear-probe"
        " accuracy (contrastive); 'acc - base' compares with FedAvg (supervised) or with the one-stage,"
        " end-to-end contrastive run `fll-ssl-e2e` of the same setting. 'client FLOPs' is all"
        " clients' training compute over the run (`client_flops`) against the FedAvg run's.",
        "",
        "| setting | variant | acc | acc - base | peak train MB | end-to-end MB | memory reduction | client FLOPs vs FedAvg "
        "| total MB | total vs FedAvg run | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    cache: dict[tuple[str, str, str], float] = {}
    flops = {
        id(r): client_flops(
            r, measured_stage_step_flops(r["model"], r["dataset"], r.get("strategy_params", {}), batch_size)
            if r["strategy"] == "fll" else [end_to_end_peak(r["model"], r["dataset"], batch_size=batch_size)["flops"]]
        )
        for r in results
    }
    for r in results:
        params = r.get("strategy_params", {})
        objective = params.get("objective", "supervised")
        key = (r["model"], r["dataset"], objective)
        if key not in cache:
            cache[key] = end_to_end_peak(r["model"], r["dataset"], objective=objective, batch_size=batch_size)["peak-train-memory-bytes"]
        e2e = cache[key]
        peak = run_peak(r["run_dir"]) if r["strategy"] == "fll" else None
        if r["strategy"] == "fedavg":
            peak = e2e
        base_variant = "fedavg" if objective == "supervised" else "fll-ssl-e2e"
        base = next((b for b in results if b["setting"] == r["setting"] and b["variant"] == base_variant), None)
        fedavg = next((b for b in results if b["setting"] == r["setting"] and b["strategy"] == "fedavg"), None)
        acc = r["final_accuracy"]
        delta = f"{(acc - base['final_accuracy']) * 100:+.2f} pt" if base else "-"
        ratio = f"{r['bytes_total'] / fedavg['bytes_total']:.1%}" if fedavg else "-"
        compute = f"{flops[id(r)] / flops[id(fedavg)]:.2f}x" if fedavg else "-"
        lines.append(
            f"| {r['setting']} | {r['variant']} | {acc:.4f} | {delta} | {peak / MB:.2f} | {e2e / MB:.2f} | "
            f"{e2e / peak:.1f}x | {compute} | {r['bytes_total'] / MB:.1f} | {ratio} | {r['wall_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    stages = sub.add_parser("stages", help="per-stage peaks measured directly")
    stages.add_argument("--models", nargs="*", default=["resnet20", "cnn"])
    stages.add_argument("--datasets", nargs="*", default=["mnist5k", "animal10k"])
    stages.add_argument("--objectives", nargs="*", default=["supervised", "contrastive"])
    stages.add_argument("--batch-size", type=int, default=32)
    stages.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    stages.add_argument("--head", default="linear", choices=STAGE_HEADS, help="stage head kind")
    stages.add_argument("--out", type=Path, default=Path("bench-out/fll-memory"))
    suite = sub.add_parser("suite", help="run a suite and add the memory columns")
    suite.add_argument("suite", type=Path)
    suite.add_argument("--out", type=Path, default=Path("bench-out/fll"))
    suite.add_argument("--set", nargs="*", default=[], help="extra overrides for every run")
    suite.add_argument("--keep", action="store_true", help="keep the runs already in <out>/results.json; run the rest")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.command == "stages":
        text, rows = stages_table(args.models, args.datasets, args.objectives, args.batch_size, args.device, args.head)
        (args.out / "memory_stages.md").write_text(text)
        (args.out / "memory_stages.json").write_text(json.dumps(rows, indent=2))
        print(text)
        return
    spec = load_suite(args.suite)
    spec["common"] = [*spec["common"], *args.set]
    results = run_suite(spec, args.out, keep=args.keep)
    batch = next((int(o.split("=")[1]) for o in spec["common"] if o.startswith("train.batch_size=")), 32)
    text = memory_report(results, batch, spec.get("title", "FLL benchmark"))
    (args.out / "memory.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
