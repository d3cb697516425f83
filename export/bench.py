"""The bench stage: latency and throughput of each backend of a run, per batch size -> RUN/bench/.

What is measured: the time of one forward call, `runner(x)`, on a batch already on the device: no
host-to-device copy, no pre- or post-processing. Inputs are seeded random images (seed 0) of the
model's input size (export/export.json, else the folded model's patch embedding).

How: per (backend, batch size), warm-up calls for `warmup_seconds` (at least 2), then timed calls until
`min_iters` calls are done or `min_seconds` have passed, whichever comes first (at least 5 calls). On
CPU each call is timed with `time.perf_counter` at a fixed thread count (torch and onnxruntime alike);
on CUDA with a pair of CUDA events around each call, recorded after a synchronise. Per pair: mean and
p50/p90/p99 latency (ms) and throughput (images/s = batch size / mean).

Writes bench/bench.json (machine, threads, rows, skipped backends with reasons, p50 ratios),
bench/bench.csv (the rows) and bench/latency.png (p50 per backend, one bar per batch size).
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from export.models import folded_model, run_config
from export.runners import RUNNER_NAMES, Runner, default_backends, open_runner, runner_inputs, unavailable
from pipeline.errors import VitfoldError
from pipeline.manifest import cpu_name, record_stage
from pipeline.run import atomic_replace, atomic_write_json, atomic_write_text

ROW_KEYS = ("backend", "device", "batch_size", "iterations", "mean_ms", "p50_ms", "p90_ms", "p99_ms", "throughput_ips")
MIN_WARMUP_CALLS, MIN_TIMED_CALLS = 2, 5
# ratio name -> (numerator backend, denominator backend), both p50 at the same batch size
RATIOS = {"folded_vs_base": ("torch-folded", "torch-base"), "unmerged_vs_folded": ("torch-unmerged", "torch-folded")}
RATIO_NOTES = {
    "folded_vs_base": "~1.0: the folded model is the base architecture",
    "unmerged_vs_folded": "folding's speedup",
}
LOG_SCALE_SPREAD = 20  # log latency axis when the slowest p50 is more than this times the fastest


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """'1,8,32' -> (1, 8, 32); a VitfoldError naming --batch-sizes otherwise."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise VitfoldError(f"--batch-sizes: no batch size in '{text}' (e.g. 1,8,32)")
    for part in parts:
        if not (part.isascii() and part.isdigit()) or int(part) == 0:
            raise VitfoldError(f"--batch-sizes: '{part}' is not a positive integer (e.g. 1,8,32)")
    return tuple(int(p) for p in parts)


def bench_stage(
    run_dir: Path,
    backends: list[str] | None = None,
    batch_sizes: tuple[int, ...] = (1, 8, 32),
    device: str = "cpu",
    threads: int | None = None,
    min_iters: int = 50,
    min_seconds: float = 3.0,
    warmup_seconds: float = 0.2,
    log=print,
) -> list[dict]:
    """Time every available backend at every batch size; write RUN/bench/ and record the stage."""
    batch_sizes = _checked_batch_sizes(batch_sizes)
    names = _checked_backends(run_dir, backends)
    _check_device(device)
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise VitfoldError(f"threads must be a positive integer, got {threads!r}")
    cfg = run_config(run_dir)
    skipped = {name: reason for name in names if (reason := unavailable(name, run_dir, device))}
    for name, reason in skipped.items():
        log(f"skipping {name}: {reason}")
    _require_some(names, skipped)
    started = time.perf_counter()
    image_size = _image_size(run_dir)
    previous_threads = torch.get_num_threads()
    threads = threads or previous_threads
    torch.set_num_threads(threads)
    timing, machine = Timing(min_iters, min_seconds, warmup_seconds), _machine(device)
    runnable = [name for name in names if name not in skipped]
    log(f"timing {', '.join(runnable)} at batch sizes {', '.join(map(str, batch_sizes))} on {device} "
        f"({machine.get('gpu') or machine['cpu']}, {threads} threads)")  # fmt: skip
    try:
        rows = _bench_all(runnable, run_dir, device, threads, batch_sizes, image_size, timing, skipped, log)
    finally:
        torch.set_num_threads(previous_threads)
    _require_some(names, skipped)
    ratios = _ratios(rows)
    for key, per_batch in ratios.items():
        log(f"{key} ({' p50 / '.join(RATIOS[key])} p50): "
            f"{', '.join(f'b{b} {r:.2f}x' for b, r in per_batch.items())} ({RATIO_NOTES[key]})")  # fmt: skip
    summary = {
        "model": cfg.backbone,
        "device": device,
        "threads": threads,
        "image_size": list(image_size),
        "machine": machine,
        "timing": asdict(timing),
        "rows": rows,
        "skipped": skipped,
        "ratios": ratios,
    }
    outputs = _write_outputs(run_dir / "bench", summary)
    ran = list(dict.fromkeys(r["backend"] for r in rows))
    record_stage(run_dir, "bench", _inputs(run_dir, names), outputs, time.perf_counter() - started,
                 device=device, batch_sizes=list(batch_sizes), threads=threads, backends=ran)  # fmt: skip
    log(f"bench: {', '.join(str(p.relative_to(run_dir)) for p in outputs)}")
    return rows


def _checked_batch_sizes(batch_sizes: Iterable[Any]) -> tuple[int, ...]:
    sizes = tuple(batch_sizes)
    if not sizes:
        raise VitfoldError("no batch size to bench (e.g. 1, 8, 32)")
    for size in sizes:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise VitfoldError(f"batch sizes must be positive integers, got {size!r}")
    return tuple(dict.fromkeys(sizes))


def _checked_backends(run_dir: Path, backends: list[str] | None) -> list[str]:
    names = list(dict.fromkeys(default_backends(run_dir, RUNNER_NAMES) if backends is None else backends))
    if not names:
        raise VitfoldError(f"no backend to bench (choose from {', '.join(RUNNER_NAMES)})")
    for name in names:
        if name not in RUNNER_NAMES:
            raise VitfoldError(f"unknown backend '{name}' (choose from {', '.join(RUNNER_NAMES)})")
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


def _image_size(run_dir: Path) -> tuple[int, int]:
    summary = run_dir / "export" / "export.json"
    if summary.is_file():
        size = json.loads(summary.read_text()).get("image_size")
        if size:
            return int(size[0]), int(size[1])
    height, width = folded_model(run_dir).patch_embed.img_size
    return int(height), int(width)


def _bench_all(
    names: list[str],
    run_dir: Path,
    device: str,
    threads: int,
    batch_sizes: tuple[int, ...],
    image_size: tuple[int, int],
    timing: Timing,
    skipped: dict[str, str],
    log,
) -> list[dict]:
    """Rows for each backend that opens on `device`; one that does not is added to `skipped`."""
    rows: list[dict] = []
    with tqdm(total=len(names) * len(batch_sizes), desc="bench", unit="case", file=sys.stderr, disable=None) as bar:
        for name in names:
            runner = _open(name, run_dir, device, threads, skipped)
            if runner is None:
                with tqdm.external_write_mode():
                    log(f"skipping {name}: {skipped[name]}")
                bar.update(len(batch_sizes))
                continue
            try:
                for batch in batch_sizes:
                    bar.set_postfix_str(f"{name} b{batch}")
                    x = runner.to_device(_images(batch, image_size))
                    rows.append(_row(runner, batch, timing.measure(runner, x)))
                    with tqdm.external_write_mode():
                        log(_describe(rows[-1]))
                    bar.update()
            finally:
                runner.close()
    return rows


def _open(name: str, run_dir: Path, device: str, threads: int, skipped: dict[str, str]) -> Runner | None:
    """The runner, or None with the reason in `skipped` (it failed to open, or runs on another device)."""
    try:
        runner = open_runner(name, run_dir, device, threads)
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


@dataclass(frozen=True)
class Timing:
    """When to stop warming up and timing one (backend, batch size)."""

    min_iters: int
    min_seconds: float
    warmup_seconds: float

    def measure(self, runner: Runner, x: torch.Tensor) -> list[float]:
        """Per-call latencies (ms) of `runner(x)` after warm-up, with the clock that fits its device."""
        self._warm_up(runner, x)
        return (_cuda_times if runner.device.type == "cuda" else _cpu_times)(runner, x, self.more)

    def _warm_up(self, runner: Runner, x: torch.Tensor) -> None:
        started, calls = time.perf_counter(), 0
        while calls < MIN_WARMUP_CALLS or time.perf_counter() - started < self.warmup_seconds:
            runner(x)
            calls += 1
        runner.synchronize()

    def more(self, calls: int, started: float) -> bool:
        """Go on until `min_iters` calls or `min_seconds`, whichever comes first, and at least 5 calls."""
        done = calls >= self.min_iters or time.perf_counter() - started >= self.min_seconds
        return calls < MIN_TIMED_CALLS or not done


def _cpu_times(runner: Runner, x: torch.Tensor, more: Callable[[int, float], bool]) -> list[float]:
    times: list[float] = []
    started = time.perf_counter()
    while more(len(times), started):
        t0 = time.perf_counter()
        runner(x)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def _cuda_times(runner: Runner, x: torch.Tensor, more: Callable[[int, float], bool]) -> list[float]:
    """Each call between two CUDA events on the current stream, the device idle before it; read at the end."""
    pairs: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
    stream = torch.cuda.current_stream(runner.device)
    started = time.perf_counter()
    while more(len(pairs), started):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        runner.synchronize()
        start.record(stream)
        runner(x)
        end.record(stream)
        pairs.append((start, end))
    runner.synchronize()
    return [start.elapsed_time(end) for start, end in pairs]


def _row(runner: Runner, batch: int, times_ms: list[float]) -> dict:
    times = np.asarray(times_ms, dtype=np.float64)
    p50, p90, p99 = np.percentile(times, [50, 90, 99])
    mean = float(times.mean())
    latency = {"mean_ms": mean, "p50_ms": p50, "p90_ms": p90, "p99_ms": p99}
    return {
        "backend": runner.name,
        "device": runner.provider,
        "batch_size": batch,
        "iterations": len(times),
        **{key: round(float(value), 4) for key, value in latency.items()},
        "throughput_ips": round(batch * 1e3 / mean, 2),
    }


def _describe(row: dict) -> str:
    return (
        f"{row['backend']:<15} {row['device']:<20} b{row['batch_size']:<4} p50 {row['p50_ms']:9.3f} ms  "
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


def _machine(device: str) -> dict[str, Any]:
    machine = {"cpu": cpu_name(), "logical_cpus": os.cpu_count(), "platform": platform.platform()}
    if torch.device(device).type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return machine


def _inputs(run_dir: Path, backends: list[str]) -> list[Path]:
    """The files the backends asked for read (the config, the export summary, their artifacts) that exist,
    skipped ones included: `vitfold run` compares these with what export wrote."""
    names = ["config.yaml", "export/export.json", *(f for name in backends for f in runner_inputs(name))]
    return [run_dir / name for name in dict.fromkeys(names) if (run_dir / name).is_file()]


def _write_outputs(out_dir: Path, summary: dict[str, Any]) -> list[Path]:
    paths = [out_dir / "bench.json", out_dir / "bench.csv", out_dir / "latency.png"]
    atomic_write_json(paths[0], summary)
    atomic_write_text(paths[1], _csv(summary["rows"]))
    atomic_replace(paths[2], _chart(summary))
    return paths


def _csv(rows: list[dict]) -> str:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=ROW_KEYS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def _chart(summary: dict[str, Any]) -> bytes:
    """PNG: horizontal bars of p50 latency per backend, one colour per batch size, whiskers to p90."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    batches = sorted({r["batch_size"] for r in rows})
    by_key = {(r["backend"], r["batch_size"]): r for r in rows}  # every benched backend ran every batch size
    height = 0.8 / len(batches)
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.3 * len(backends) * len(batches)), dpi=120)
    for i, batch in enumerate(batches):
        found = [by_key[name, batch] for name in backends]
        p50 = [r["p50_ms"] for r in found]
        to_p90 = [r["p90_ms"] - r["p50_ms"] for r in found]
        y = np.arange(len(backends)) + (i - (len(batches) - 1) / 2) * height
        bars = ax.barh(y, p50, height, xerr=[[0.0] * len(found), to_p90], capsize=2, label=str(batch))
        ax.bar_label(bars, labels=[f"{v:.3g} ms" for v in p50], padding=3, fontsize=7)
    providers = {r["backend"]: r["device"] for r in rows}
    ax.set_yticks(np.arange(len(backends)), [f"{name}\n({providers[name]})" for name in backends])
    ax.invert_yaxis()
    p50s = [r["p50_ms"] for r in rows]
    if max(p50s) > LOG_SCALE_SPREAD * min(p50s):
        from matplotlib.ticker import NullFormatter, ScalarFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())  # 1, 10, 100 rather than 10^0 ...
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.margins(x=0.15)
    ax.set_xlabel("p50 latency per call (ms), whisker to p90" + (" — log scale" if ax.get_xscale() == "log" else ""))
    ax.set_ylabel("backend")
    machine = summary["machine"].get("gpu") or summary["machine"]["cpu"]
    ax.set_title(f"{summary['model']} {summary['image_size'][0]}x{summary['image_size'][1]}: latency on "
                 f"{summary['device']}, {summary['threads']} threads\n{machine}", fontsize=10)  # fmt: skip
    ax.legend(title="batch size", loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    data = io.BytesIO()
    fig.savefig(data, format="png")
    plt.close(fig)
    return data.getvalue()
