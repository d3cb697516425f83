"""Which statistic of the interleaved rounds says whether a bench row holds still: the spread of the rounds'
means or of their medians, measured on a run's own backends on this machine.

    python benchmarks/bench_stability.py RUN [--repeats 3] [--batch-sizes 1,8,32] [--min-seconds 1.0]
        [--rounds 10] [--warmup-seconds 0.2] [--threads 2] [--gc paused|on|alternate]
        [--malloc kept|default|alternate] [--out stability.json]

Times every backend of RUN exactly as `vitfold bench` does (the run's artifacts, `Timing` with its untimed
call per round, ONNX Runtime not spinning), `--repeats` times in a row. For each row it reports, per repeat,
the rounds' rel IQR of the per-round means (what a single call that the OS or the hypervisor delays moves)
and of the per-round medians (what the row's p50 is made of), the spread of those medians once the
machine's drift shared by every backend of a round is divided out (`vitfold.export.timing.machine_drift`),
the p50 and the mean, and the fraction of calls over twice the row's median (stalls). Across repeats,
each row's p50 spread says how far a figure from one bench run can be trusted. `--gc alternate` pauses
Python's garbage collector in every other repeat (as `vitfold bench` does: `Timing.gc_paused`) and leaves it
on in the others, in the same process, and summarises the two apart; `--malloc alternate` does the same
with glibc's malloc keeping freed memory (`Timing.malloc_kept`) or left as it is.
"""

from __future__ import annotations

import argparse
import json
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch

from vitfold.export.timing import Timing, machine, machine_drift, own_spread, rel_iqr, round_means, round_medians
from vitfold.names import BACKENDS
from vitfold.pipeline.stages.backends import backend_unavailable, default_backends, open_backend
from vitfold.pipeline.stages.rundir import RunDir


def _row(per_round: list[list[float]], drift: np.ndarray | None) -> dict[str, float]:
    calls = np.concatenate([np.asarray(r) for r in per_round])
    median = float(np.median(calls))
    return {
        "p50_ms": round(median, 4),
        "mean_ms": round(float(calls.mean()), 4),
        "iqr_of_round_means": round(rel_iqr(round_means(per_round)), 4),
        "iqr_of_round_medians": round(rel_iqr(round_medians(per_round)), 4),
        "own_iqr_drift_removed": None if drift is None else round(own_spread(round_medians(per_round), drift), 4),
        "stalled_calls": round(float((calls > 2 * median).mean()), 4),
        "calls": int(calls.size),
        "round_medians_ms": [round(float(v), 4) for v in round_medians(per_round)],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--min-seconds", type=float, default=1.0)
    ap.add_argument("--min-iters", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--warmup-seconds", type=float, default=0.2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gc", choices=["paused", "on", "alternate"], default="paused")
    ap.add_argument("--malloc", choices=["kept", "default", "alternate"], default="kept")
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rd = RunDir(args.run)
    timings = {
        (paused, kept): Timing(
            args.min_iters, args.min_seconds, args.warmup_seconds, args.rounds, gc_paused=paused, malloc_kept=kept
        )
        for paused in (True, False)
        for kept in (True, False)
    }
    batches = [int(b) for b in args.batch_sizes.split(",")]
    names = [n for n in default_backends(rd, BACKENDS) if backend_unavailable(rd, n, "cpu") is None]
    found: dict[str, list[dict]] = {}
    with ExitStack() as stack:
        runners = {}
        for name in names:
            runners[name] = stack.enter_context(open_backend(rd, name, "cpu", args.threads, trust=True, spin=False))
        for repeat in range(args.repeats):
            paused = args.gc == "paused" or (args.gc == "alternate" and repeat % 2 == 0)
            kept = args.malloc == "kept" or (args.malloc == "alternate" and repeat % 2 == 0)
            timing = timings[paused, kept]
            mode = ("" if paused else " gc on") + ("" if kept else " malloc default")
            for batch in batches:
                x = torch.randn(batch, 3, *rd.image_size(), generator=torch.Generator().manual_seed(0))
                cases = {n: (r, x) for n, r in runners.items()}
                measured = timing.measure(cases)
                drift = machine_drift({n: round_medians(r) for n, r in measured.items()})
                for name, per_round in measured.items():
                    row = {"repeat": repeat, "gc_paused": paused, "malloc_kept": kept, **_row(per_round, drift)}
                    found.setdefault(f"{name} b{batch}{mode}", []).append(row)
                    print(f"{name:20s} b{batch:<3d} repeat {repeat}: {row['iqr_of_round_medians']:.3f}", flush=True)
    summary = {
        key: {
            "worst_iqr_of_round_means": max(r["iqr_of_round_means"] for r in rows),
            "worst_iqr_of_round_medians": max(r["iqr_of_round_medians"] for r in rows),
            "worst_own_iqr": max(r["own_iqr_drift_removed"] or 0.0 for r in rows),
            "p50_spread_across_repeats": round(rel_iqr(np.array([r["p50_ms"] for r in rows])), 4),
            "mean_spread_across_repeats": round(rel_iqr(np.array([r["mean_ms"] for r in rows])), 4),
        }
        for key, rows in found.items()
    }
    for key, s in summary.items():
        print(f"{key:26s} {s}")
    if args.out:
        settings = vars(args) | {"run": str(args.run), "out": args.out}
        result = {"machine": machine(), "settings": settings, "rows": found, "summary": summary}
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
