"""The bench stage: latency and throughput of each backend of a run, per batch size -> RUN/bench/.

Inputs are seeded random images (seed 0) of the model's input size (as the fold stage recorded it).
Every runnable backend is opened at once; per batch size each is warmed up, then `vitfold.export.timing`
times them in rounds that alternate the backends (A B C, A B C, ...), at a fixed thread count (torch and
onnxruntime alike), at least `min_iters` calls and `min_seconds` seconds per row. Each row: mean, p50,
p90 and p99 latency (ms; p99 only from 100 calls), throughput (images/s = batch size / mean), the
rounds, the spread of the per-round means (`rel_iqr`, IQR / median), the row's own spread once the
machine's drift is divided out (`own_rel_iqr`; with three or more backends, the drift is the per-round speed
factor they share, `machine_drift` in bench.json; with fewer, it is `rel_iqr`) and `unstable` when the own
spread is above `unstable_above`. A ratio built from an unstable row is marked unreliable. The machine's
drift moves every row's milliseconds alike, which the ratios cancel; a drifting machine is reported as such.

Each round of a backend starts with an untimed call (`Timing.round_warmup`), Python's garbage collector is
paused while the rounds run (`Timing.gc_paused`; both recorded in bench.json's `timing`), glibc's malloc keeps
freed memory for reuse while timing (`Timing.malloc_kept`; the mallopt values in bench.json's `malloc`, None
elsewhere), and ONNX Runtime's idle
threads do not spin (`spin`, off by default): a spinning pool keeps the cores busy after its calls, and
the next backend in the round pays for it. On the CPU, each row also gets its achieved GFLOP/s (the
model's forward FLOPs, `vitfold.export.roofline.forward_flops`, over its p50) and its share of the matmul
peak of its precision measured here at the same threads (`of_peak`).

Writes bench/bench.json (machine with its instruction sets, threads, each backend's thread and spin
settings (`runtimes`), rows, skipped backends with reasons, ratios, the roofline's FLOPs and peaks),
bench/bench.csv (the rows) and bench/latency.png (p50 per backend, one bar per batch size).
"""

from __future__ import annotations

import csv
import io
import sys
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from vitfold.errors import VitfoldError
from vitfold.export.aoti import package_cpu_isa
from vitfold.export.charts import latency_chart
from vitfold.export.isa import inductor_vec_isa
from vitfold.export.runners import Runner
from vitfold.export.timing import (
    Timing,
    latency_stats,
    machine,
    machine_drift,
    malloc_settings,
    rel_iqr,
    round_medians,
)
from vitfold.pipeline.atomic import atomic_replace, atomic_write_json, atomic_write_text
from vitfold.pipeline.config import BenchConfig
from vitfold.pipeline.stages.backends import (
    ARTIFACT_BACKENDS,
    BACKENDS,
    backend_files,
    backend_precision,
    backend_unavailable,
    check_backend,
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
    "rounds",
    "mean_ms",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "rel_iqr",
    "own_rel_iqr",
    "unstable",
    "throughput_ips",
    "gflop_per_s",
    "of_peak",
)
# ratio name -> (numerator backend, denominator backend), both p50 at the same batch size
RATIOS = {"folded_vs_base": ("torch-folded", "torch-base"), "unmerged_vs_folded": ("torch-unmerged", "torch-folded")}
RATIO_NOTES = {
    "folded_vs_base": "~1.0: the folded model is the base architecture",
    "unmerged_vs_folded": "folding's speedup",
}


def _run(rd: RunDir, b: BenchConfig, ctx: Context) -> StageResult:
    """Time every available backend at every batch size in interleaved rounds; write RUN/bench/."""
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
    timing, found = Timing(b.min_iters, b.min_seconds, b.warmup_seconds, b.rounds), machine(b.device)
    runnable = [name for name in names if name not in skipped]
    for name in runnable:  # a changed, unrecorded or untrusted file stops the bench, as it stops verify
        check_backend(rd, name, ctx.trust)
    ctx.log(
        f"timing {', '.join(runnable)} at batch sizes {', '.join(map(str, batch_sizes))} on {b.device} "
        f"({found.get('gpu') or found['cpu']}, {' '.join(found['cpu_isa']) or 'ISA unknown'}, {threads} threads), "
        f"{b.rounds} interleaved rounds"
    )
    runtimes: dict[str, dict[str, Any]] = {}
    drifts: dict[str, dict[str, Any] | None] = {}
    try:
        rows, medians = _bench_all(
            rd, runnable, b, threads, batch_sizes, image_size, timing, skipped, runtimes, drifts, ctx
        )
        roofline = _roofline(rd, rows, threads, image_size, ctx) if b.roofline and b.device == "cpu" else None
    finally:
        torch.set_num_threads(previous_threads)
    _require_some(names, skipped)
    ran = list(dict.fromkeys(r["backend"] for r in rows))
    found.update(_aoti_isa(rd, ran))
    ratios = bench_ratios(rows, medians)
    for key, ratio in ratios.items():
        ctx.log(ratio_line(key, ratio))
    summary = {
        "model": cfg.backbone,
        "device": b.device,
        "threads": threads,
        "spin": b.spin,
        "runtimes": runtimes,
        "image_size": list(image_size),
        "machine": found,
        "timing": asdict(timing),
        "malloc": malloc_settings(timing.malloc_kept),
        "unstable_above": b.unstable_above,
        "machine_drift": drifts,
        "rows": rows,
        "skipped": skipped,
        "ratios": ratios,
        "roofline": roofline,
    }
    outputs = _write_outputs(rd.bench_dir, summary)
    ctx.log(f"bench: {', '.join(rd.key(p) for p in outputs)}")
    extra = {"device": b.device, "batch_sizes": list(batch_sizes), "threads": threads, "backends": ran}
    return StageResult(outputs, value=rows, extra=extra)


def _inputs(rd: RunDir, b: BenchConfig) -> list[Path]:
    """What the backends read: the adapter, the folded model and every artifact the export stage recorded."""
    return list(dict.fromkeys([*backend_files(rd, "torch-unmerged"), rd.folded, *recorded_outputs(rd, "export")]))


BENCH = Stage("bench", section="bench", inputs=_inputs, run=_run)


def _checked_backends(rd: RunDir, backends: list[str] | None) -> list[str]:
    names = list(dict.fromkeys(default_backends(rd, BACKENDS) if backends is None else backends))
    if not names:  # names were checked with the settings (check_config), before the stage was marked running
        raise VitfoldError(f"no backend to bench (choose from {', '.join(BACKENDS)})")
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
    b: BenchConfig,
    threads: int,
    batch_sizes: tuple[int, ...],
    image_size: tuple[int, int],
    timing: Timing,
    skipped: dict[str, str],
    runtimes: dict[str, dict[str, Any]],
    drifts: dict[str, dict[str, Any] | None],
    ctx: Context,
) -> tuple[list[dict], dict[tuple[str, int], np.ndarray]]:
    """Rows for each backend that opens on `b.device` (one that does not is added to `skipped`; each one
    that does has its thread and spin settings put in `runtimes`, and each batch size's machine drift is put
    in `drifts`), and each row's per-round medians (for the ratios' spread), keyed by (backend, batch size).

    Every runner stays open for the whole bench so that the rounds can alternate them: memory holds all
    the backends' copies of the model at once, which is acceptable at bench scale (one model, a handful
    of runtimes) but adds up for a big model."""
    rows: list[dict] = []
    medians: dict[tuple[str, int], np.ndarray] = {}
    with ExitStack() as stack:
        runners: dict[str, Runner] = {}
        for name in names:
            runner = _open(rd, name, b.device, threads, skipped, ctx.trust, b.spin)
            if runner is None:
                ctx.log(f"skipping {name}: {skipped[name]}")
            else:
                runners[name] = stack.enter_context(runner)
                runtimes[name] = runner.settings
        with tqdm(total=len(batch_sizes), desc="bench", unit="batch size", file=sys.stderr, disable=None) as bar:
            for batch in batch_sizes:
                bar.set_postfix_str(f"b{batch}")
                cases = {name: (r, r.to_device(_images(batch, image_size))) for name, r in runners.items()}
                measured = timing.measure(cases)
                now = {name: round_medians(per_round) for name, per_round in measured.items()}
                drift = machine_drift(now)
                drifts[str(batch)] = None if drift is None else _drift_summary(drift)
                for name, per_round in measured.items():
                    stats = latency_stats(per_round, b.unstable_above, drift)
                    rows.append(_row(name, backend_precision(rd, name), runners[name], batch, stats))
                    medians[name, batch] = now[name]
                    with tqdm.external_write_mode():
                        ctx.log(_describe(rows[-1]))
                bar.update()
    return rows, medians


def _drift_summary(drift: np.ndarray) -> dict[str, Any]:
    """bench.json's `machine_drift` at one batch size: the machine's speed factor per round and its spread."""
    return {"per_round": [round(float(v), 4) for v in drift], "rel_iqr": round(rel_iqr(drift), 4)}


def _open(
    rd: RunDir, name: str, device: str, threads: int, skipped: dict[str, str], trust: bool, spin: bool
) -> Runner | None:
    """The runner, or None with the reason in `skipped` (it failed to open, or runs on another device)."""
    try:
        runner = open_backend(rd, name, device, threads, trust, spin)
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


def _row(name: str, precision: str, runner: Runner, batch: int, stats: dict[str, Any]) -> dict:
    """One row of bench.json and bench.csv (the keys of ROW_KEYS, in order) from `latency_stats`."""
    found = {
        "backend": name,
        "provider": runner.provider,
        "device": runner.device.type,
        "precision": precision,
        "batch_size": batch,
        "throughput_ips": round(batch * 1e3 / stats["mean_ms"], 2),
        **{key: value if value is None else round(value, 4) for key, value in stats.items() if key.endswith("_ms")},
        "rel_iqr": round(stats["rel_iqr"], 4),
        "own_rel_iqr": round(stats["own_rel_iqr"], 4),
        **{key: stats[key] for key in ("iterations", "rounds", "unstable")},
        "gflop_per_s": None,  # filled in by `_roofline` on the CPU
        "of_peak": None,
    }
    return {key: found[key] for key in ROW_KEYS}


def _roofline(
    rd: RunDir, rows: list[dict], threads: int, image_size: tuple[int, int], ctx: Context
) -> dict[str, Any] | None:
    """Each row's achieved GFLOP/s (batch × the forward's FLOPs per image over its p50) and its share of the
    matmul peak of its precision, measured now at `threads`; bench.json's `roofline` (None without rows)."""
    from vitfold.export.roofline import forward_flops, matmul_peaks
    from vitfold.pipeline.stages.backends import folded_model

    if not rows:
        return None
    gflop = forward_flops(folded_model(rd), _images(1, image_size)) / 1e9
    peaks = matmul_peaks(threads)
    for row in rows:
        achieved = row["batch_size"] * gflop / (row["p50_ms"] / 1e3)
        row["gflop_per_s"] = round(achieved, 2)
        peak = peaks.get(row["precision"])
        row["of_peak"] = None if peak is None else round(achieved / peak.gflop_per_s, 4)
    ctx.log(
        f"roofline: {gflop:.3f} GFLOP per image; matmul peaks here at {threads} threads: "
        + ", ".join(f"{p} {v.gflop_per_s:.1f} GFLOP/s ({v.by})" for p, v in peaks.items())
    )
    return {
        "gflop_per_image": round(gflop, 4),
        "peak_gflop_per_s": {p: round(v.gflop_per_s, 1) for p, v in peaks.items()},
        "peak_by": {p: v.by for p, v in peaks.items()},
    }


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _describe(row: dict) -> str:
    return (
        f"{row['backend']:<16} {row['provider']:<20} b{row['batch_size']:<4} p50 {row['p50_ms']:9.3f} ms "
        f"(rounds' IQR {row['rel_iqr']:.1%})  p90 {row['p90_ms']:9.3f}  p99 {_ms(row['p99_ms']):>9} ms  "
        f"{row['throughput_ips']:10.1f} img/s  ({row['iterations']} calls, {row['rounds']} rounds)"
        + ("  UNSTABLE" if row["unstable"] else "")
    )


def bench_ratios(rows: list[dict], medians: dict[tuple[str, int], np.ndarray]) -> dict[str, dict[str, Any]]:
    """Per ratio of RATIOS, where both backends ran: its backends, its note and, per batch size (a string
    key), the ratio of the two p50s, the IQR of the per-round ratios (the median of round i of one backend
    over that of round i of the other, which ran next to it) and `reliable`: False when either row is
    unstable (named in `unstable`)."""
    by_key = {(row["backend"], row["batch_size"]): row for row in rows}
    ratios: dict[str, dict[str, Any]] = {}
    for key, (num, den) in RATIOS.items():
        batches: dict[str, dict[str, Any]] = {}
        for (name, b), row in by_key.items():
            if name != num or (den, b) not in by_key:
                continue
            q25, q75 = np.percentile(medians[num, b] / medians[den, b], [25, 75])
            unstable = [r["backend"] for r in (row, by_key[den, b]) if r["unstable"]]
            batches[str(b)] = {
                "ratio": round(row["p50_ms"] / by_key[den, b]["p50_ms"], 3),
                "round_iqr": [round(float(q25), 3), round(float(q75), 3)],
                "reliable": not unstable,
                "unstable": unstable,
            }
        if batches:
            ratios[key] = {"numerator": num, "denominator": den, "note": RATIO_NOTES[key], "batches": batches}
    return ratios


def ratio_line(key: str, ratio: dict[str, Any]) -> str:
    """One line for the console and the report: each batch size's ratio with its per-round IQR, or
    "unreliable" with the unstable rows; the ratio's note only when every value is reliable."""
    values = [
        f"b{b} {r['ratio']:.3f} (rounds {r['round_iqr'][0]:.3f}–{r['round_iqr'][1]:.3f})"
        if r["reliable"]
        else f"b{b} unreliable {r['ratio']:.3f} ({', '.join(r['unstable'])} unstable)"
        for b, r in ratio["batches"].items()
    ]
    reliable = all(r["reliable"] for r in ratio["batches"].values())
    verdict = ratio["note"] if reliable else "unreliable: built from unstable rows, rerun on a quiet machine"
    return f"{key} ({ratio['numerator']} p50 / {ratio['denominator']} p50): {', '.join(values)} — {verdict}"


def _aoti_isa(rd: RunDir, backends: list[str]) -> dict[str, Any]:
    """With an AOTInductor backend benched: the ISA inductor compiles for on this machine, and the one
    each benched .pt2 records that it was compiled for."""
    aoti = [name for name in backends if ARTIFACT_BACKENDS.get(name, ("",))[0] == "aoti"]
    if not aoti:
        return {}
    compiled = {name: package_cpu_isa(rd.artifact(ARTIFACT_BACKENDS[name][1])) for name in aoti}
    return {"inductor_vec_isa": inductor_vec_isa(), "aoti_compiled_isa": compiled}


def _write_outputs(out_dir: Path, summary: dict[str, Any]) -> list[Path]:
    paths = [out_dir / "bench.json", out_dir / "bench.csv", out_dir / "latency.png"]
    where = summary["machine"].get("gpu") or summary["machine"]["cpu"]
    size = summary["image_size"]
    title = (
        f"{summary['model']} {size[0]}x{size[1]}: latency on {summary['device']}, {summary['threads']} threads\n{where}"
    )
    chart = latency_chart(summary["rows"], title)  # None without matplotlib (the `plots` extra)
    summary["chart"] = paths[2].name if chart is not None else None
    atomic_write_json(paths[0], summary)
    atomic_write_text(paths[1], _csv(summary["rows"]))
    if chart is None:
        return paths[:2]
    atomic_replace(paths[2], chart)
    return paths


def _csv(rows: list[dict]) -> str:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=ROW_KEYS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()
