"""The bench stage: latency and throughput of each backend of a run, per batch size -> RUN/bench/.

Inputs are seeded random images (seed 0) of the model's input size (as the fold stage recorded it).
Each (backend, batch size) is timed with `vitfold.export.timing` at a fixed thread count (torch and
onnxruntime alike): mean and p50/p90/p99 latency (ms) and throughput (images/s = batch size / mean).

Writes bench/bench.json (machine, threads, rows, skipped backends with reasons, p50 ratios),
bench/bench.csv (the rows) and bench/latency.png (p50 per backend, one bar per batch size).
"""

from __future__ import annotations

import csv
import io
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from vitfold.errors import VitfoldError
from vitfold.export.charts import latency_chart
from vitfold.export.runners import Runner
from vitfold.export.timing import Timing, latency_stats, machine
from vitfold.pipeline.atomic import atomic_replace, atomic_write_json, atomic_write_text
from vitfold.pipeline.config import BenchConfig
from vitfold.pipeline.stages.backends import (
    ARTIFACT_BACKENDS,
    BACKENDS,
    backend_files,
    backend_precision,
    backend_unavailable,
    checked_artifact,
    default_backends,
    open_backend,
)
from vitfold.pipeline.stages.manifest import recorded_outputs
from vitfold.pipeline.stages.rundir import RunDir
from vitfold.pipeline.stages.stage import Context, Stage, StageResult

ROW_KEYS = (
    "backend",
    "provider",
    "device",
    "precision",
    "batch_size",
    "iterations",
    "mean_ms",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "throughput_ips",
)
# ratio name -> (numerator backend, denominator backend), both p50 at the same batch size
RATIOS = {"folded_vs_base": ("torch-folded", "torch-base"), "unmerged_vs_folded": ("torch-unmerged", "torch-folded")}
RATIO_NOTES = {
    "folded_vs_base": "~1.0: the folded model is the base architecture",
    "unmerged_vs_folded": "folding's speedup",
}


def _run(rd: RunDir, b: BenchConfig, ctx: Context) -> StageResult:
    """Time every available backend at every batch size; write RUN/bench/."""
    batch_sizes = tuple(dict.fromkeys(b.batch_sizes))  # values checked with the config (check_config)
    names = _checked_backends(rd, b.backends)
    _check_device(b.device)
    cfg = rd.config
    skipped = {name: reason for name in names if (reason := backend_unavailable(rd, name, b.device))}
    for name, reason in skipped.items():
        ctx.log(f"skipping {name}: {reason}")
    _require_some(names, skipped)
    image_size = rd.image_size()
    previous_threads = torch.get_num_threads()
    threads = b.threads or previous_threads
    torch.set_num_threads(threads)
    timing, found = Timing(b.min_iters, b.min_seconds, b.warmup_seconds), machine(b.device)
    runnable = [name for name in names if name not in skipped]
    for name in runnable:  # a changed, unrecorded or untrusted artifact stops the bench, as it stops verify
        if name in ARTIFACT_BACKENDS:
            checked_artifact(rd, name, ctx.trust)
    ctx.log(
        f"timing {', '.join(runnable)} at batch sizes {', '.join(map(str, batch_sizes))} on {b.device} "
        f"({found.get('gpu') or found['cpu']}, {threads} threads)"
    )
    try:
        rows = _bench_all(rd, runnable, b.device, threads, batch_sizes, image_size, timing, skipped, ctx)
    finally:
        torch.set_num_threads(previous_threads)
    _require_some(names, skipped)
    ratios = _ratios(rows)
    for key, per_batch in ratios.items():
        ctx.log(
            f"{key} ({' p50 / '.join(RATIOS[key])} p50): "
            f"{', '.join(f'b{b} {r:.2f}x' for b, r in per_batch.items())} ({RATIO_NOTES[key]})"
        )
    summary = {
        "model": cfg.backbone,
        "device": b.device,
        "threads": threads,
        "image_size": list(image_size),
        "machine": found,
        "timing": asdict(timing),
        "rows": rows,
        "skipped": skipped,
        "ratios": ratios,
    }
    outputs = _write_outputs(rd.bench_dir, summary)
    ctx.log(f"bench: {', '.join(rd.key(p) for p in outputs)}")
    ran = list(dict.fromkeys(r["backend"] for r in rows))
    extra = {"device": b.device, "batch_sizes": list(batch_sizes), "threads": threads, "backends": ran}
    return StageResult(outputs, value=rows, extra=extra)


def _inputs(rd: RunDir, b: BenchConfig) -> list[Path]:
    """What the backends read: the adapter, the folded model and every artifact the export stage recorded."""
    return list(dict.fromkeys([*backend_files(rd, "torch-unmerged"), rd.folded, *recorded_outputs(rd, "export")]))


BENCH = Stage("bench", section="bench", inputs=_inputs, run=_run)


def _checked_backends(rd: RunDir, backends: list[str] | None) -> list[str]:
    names = list(dict.fromkeys(default_backends(rd, BACKENDS) if backends is None else backends))
    if not names:
        raise VitfoldError(f"no backend to bench (choose from {', '.join(BACKENDS)})")
    for name in names:
        if name not in BACKENDS:
            raise VitfoldError(f"unknown backend '{name}' (choose from {', '.join(BACKENDS)})")
    return names


def _check_device(device: str) -> None:
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        kind = None
    if kind not in ("cpu", "cuda"):
        raise VitfoldError(f"device '{device}': use cpu or cuda[:N]")
    if kind == "cuda" and not torch.cuda.is_available():
        raise VitfoldError(f"device '{device}': no CUDA GPU visible")


def _require_some(names: list[str], skipped: dict[str, str]) -> None:
    if all(name in skipped for name in names):
        reasons = "; ".join(f"{name}: {reason}" for name, reason in skipped.items())
        raise VitfoldError(f"nothing to bench: {reasons}")


def _bench_all(
    rd: RunDir,
    names: list[str],
    device: str,
    threads: int,
    batch_sizes: tuple[int, ...],
    image_size: tuple[int, int],
    timing: Timing,
    skipped: dict[str, str],
    ctx: Context,
) -> list[dict]:
    """Rows for each backend that opens on `device`; one that does not is added to `skipped`."""
    rows: list[dict] = []
    with tqdm(total=len(names) * len(batch_sizes), desc="bench", unit="case", file=sys.stderr, disable=None) as bar:
        for name in names:
            runner = _open(rd, name, device, threads, skipped, ctx.trust)
            if runner is None:
                with tqdm.external_write_mode():
                    ctx.log(f"skipping {name}: {skipped[name]}")
                bar.update(len(batch_sizes))
                continue
            with runner:
                for batch in batch_sizes:
                    bar.set_postfix_str(f"{name} b{batch}")
                    x = runner.to_device(_images(batch, image_size))
                    rows.append(_row(name, backend_precision(rd, name), runner, batch, timing.measure(runner, x)))
                    with tqdm.external_write_mode():
                        ctx.log(_describe(rows[-1]))
                    bar.update()
    return rows


def _open(rd: RunDir, name: str, device: str, threads: int, skipped: dict[str, str], trust: bool) -> Runner | None:
    """The runner, or None with the reason in `skipped` (it failed to open, or runs on another device)."""
    try:
        runner = open_backend(rd, name, device, threads, trust)
    except VitfoldError as e:
        skipped[name] = str(e)
        return None
    if runner.device.type != torch.device(device).type:
        skipped[name] = f"runs on {runner.device.type}, not {device}"
        runner.close()
        return None
    return runner


def _images(batch: int, image_size: tuple[int, int]) -> torch.Tensor:
    return torch.randn(batch, 3, *image_size, generator=torch.Generator().manual_seed(0))


def _row(name: str, precision: str, runner: Runner, batch: int, times_ms: list[float]) -> dict:
    stats = latency_stats(times_ms)
    return {
        "backend": name,
        "provider": runner.provider,
        "device": runner.device.type,
        "precision": precision,
        "batch_size": batch,
        "iterations": len(times_ms),
        **{key: round(value, 4) for key, value in stats.items()},
        "throughput_ips": round(batch * 1e3 / stats["mean_ms"], 2),
    }


def _describe(row: dict) -> str:
    return (
        f"{row['backend']:<16} {row['provider']:<20} b{row['batch_size']:<4} p50 {row['p50_ms']:9.3f} ms  "
        f"p90 {row['p90_ms']:9.3f} ms  {row['throughput_ips']:10.1f} img/s  ({row['iterations']} calls)"
    )


def _ratios(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per ratio, per batch size (as a string key): numerator p50 / denominator p50, where both ran."""
    p50 = {(row["backend"], row["batch_size"]): row["p50_ms"] for row in rows}
    ratios: dict[str, dict[str, float]] = {}
    for key, (num, den) in RATIOS.items():
        per_batch = {
            str(b): round(ms / p50[den, b], 3) for (name, b), ms in p50.items() if name == num and (den, b) in p50
        }
        if per_batch:
            ratios[key] = per_batch
    return ratios


def _write_outputs(out_dir: Path, summary: dict[str, Any]) -> list[Path]:
    paths = [out_dir / "bench.json", out_dir / "bench.csv", out_dir / "latency.png"]
    atomic_write_json(paths[0], summary)
    atomic_write_text(paths[1], _csv(summary["rows"]))
    where = summary["machine"].get("gpu") or summary["machine"]["cpu"]
    size = summary["image_size"]
    title = (
        f"{summary['model']} {size[0]}x{size[1]}: latency on {summary['device']}, {summary['threads']} threads\n{where}"
    )
    atomic_replace(paths[2], latency_chart(summary["rows"], title))
    return paths


def _csv(rows: list[dict]) -> str:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=ROW_KEYS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()
