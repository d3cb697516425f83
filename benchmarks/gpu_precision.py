"""Reduced-precision latency on a GPU, with and without CUDA graphs, for a run exported on CUDA.

    python benchmarks/gpu_precision.py RUN [--out gpu_precision.json] [--rounds 10]

Variants: the folded model in torch at fp32 / fp16 / bf16, each also replayed from a CUDA graph
(`CudaGraphRunner`), and every CUDA AOTInductor package of the run (model.pt2, model.fp16.pt2,
model.bf16.pt2; not captured: that crashed torch 2.11).
Batch 1: median ms per call over rounds that alternate the variants; batch `--throughput-batch`: images/s.
Each variant's logits at batch 8 are compared with torch-folded fp32 by its precision's default gate.
"""

from __future__ import annotations

import argparse
import json
from datetime import date
from pathlib import Path

import numpy as np
import torch

from vitfold.export import FILES
from vitfold.export.comparison import DEFAULT_TOLERANCES, compare
from vitfold.export.precision import at_precision
from vitfold.export.runners import CudaGraphRunner, Runner, open_runner
from vitfold.export.timing import interleaved_rounds, machine
from vitfold.pipeline.stages.backends import folded_model
from vitfold.pipeline.stages.rundir import RunDir

AOTI = {"fp32": "aoti", "fp16": "aoti-fp16", "bf16": "aoti-bf16"}


def open_variants(rd: RunDir, runtimes: list[str]) -> dict[str, tuple[str, Runner]]:
    """name -> (precision, runner on cuda), each with a CUDA-graph twin."""
    folded = folded_model(rd)
    runners: dict[str, tuple[str, Runner]] = {}
    for precision in ("fp32", "fp16", "bf16"):
        if "torch" in runtimes:
            runners[f"torch-{precision}"] = (precision, open_runner("torch", at_precision(folded, precision), "cuda"))
        package = rd.export_dir / FILES[AOTI[precision]]
        if "aoti" in runtimes and package.is_file():
            runners[f"aoti-{precision}"] = (precision, open_runner("aoti", package, "cuda"))
    return {
        **runners,
        **{f"{name}+graph": (p, CudaGraphRunner(runner)) for name, (p, runner) in runners.items() if "torch" in name},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, default=Path("gpu_precision.json"))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--throughput-batch", type=int, default=256)
    parser.add_argument("--runtimes", default="torch,aoti", help="comma-separated: torch, aoti")
    args = parser.parse_args()
    rd = RunDir(args.run)
    size = rd.image_size()
    variants = open_variants(rd, args.runtimes.split(","))
    g = torch.Generator().manual_seed(0)
    x8 = torch.randn(8, 3, *size, generator=g).cuda()
    with torch.no_grad():
        reference = folded_model(rd).cuda()(x8).float().cpu()
    results: dict[str, dict] = {}
    for name, (precision, runner) in list(variants.items()):
        try:  # the first call of a graph variant captures its graph
            check = compare(reference, runner(x8).float().cpu(), DEFAULT_TOLERANCES[precision])
        except Exception as e:  # noqa: BLE001 - a variant that cannot run is reported, the others still timed
            results[name] = {"precision": precision, "error": f"{type(e).__name__}: {e}"}
            del variants[name]
            continue
        results[name] = {"precision": precision, "gate": check.to_dict()}
    for batch, key in ((1, "batch1"), (args.throughput_batch, f"batch{args.throughput_batch}")):
        x = torch.randn(batch, 3, *size, generator=g).cuda()
        iters = 20 if batch == 1 else 3
        calls = {name: (lambda r=runner, x=x: r(x)) for name, (_, runner) in variants.items()}
        rounds = interleaved_rounds(calls, warmup=3, iters=iters, rounds=args.rounds, device="cuda")
        for name, ms in rounds.items():
            median = float(np.median(ms))
            results[name][key] = {
                "median_ms": round(median, 4),
                "min_ms": round(float(np.min(ms)), 4),
                "max_ms": round(float(np.max(ms)), 4),
                "images_per_s": round(batch * 1e3 / median, 1),
            }
    summary = {"date": str(date.today()), "machine": machine("cuda"), "torch": torch.__version__, "results": results}
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    tb = f"batch{args.throughput_batch}"
    print(f"{'variant':<20} {'gate':<5} {'max_rel':>9} {'b1 ms':>8} {'b1 min-max':>15} {tb + ' img/s':>14}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<20} error: {r['error']}")
            continue
        b1 = r["batch1"]
        print(
            f"{name:<20} {'pass' if r['gate']['passed'] else 'FAIL':<5} {r['gate']['max_rel']:9.2e} "
            f"{b1['median_ms']:8.3f} {b1['min_ms']:7.3f}-{b1['max_ms']:<7.3f} {r[tb]['images_per_s']:14.1f}"
        )


if __name__ == "__main__":
    main()
