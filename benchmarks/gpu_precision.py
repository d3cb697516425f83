"""Reduced-precision latency on a GPU, with and without CUDA graphs, for a run exported on CUDA.

    python benchmarks/gpu_precision.py RUN [--out gpu_precision.json] [--rounds 10]
    python benchmarks/gpu_precision.py --random-model vit_base_patch16_224 --runtimes torch,compiled \
        --compiled-precisions fp16,bf16 [--compile-mode max-autotune]

Variants: the folded model in torch at fp32 / fp16 / bf16, each also replayed from a CUDA graph
(`CudaGraphRunner`); with runtime `compiled`, the folded model `torch.compile`d in `--compile-mode` at each
of `--compiled-precisions` (max-autotune tunes the matmuls and replays CUDA graphs; one compile per batch
size, shapes static); and every CUDA AOTInductor package of the run (model.pt2, model.fp16.pt2,
model.bf16.pt2; not captured: that crashed torch 2.11). `--random-model BACKBONE` times a folded RLRR model
of random weights instead of a run's (speed does not depend on the values; the gates still compare with
its fp32 logits).
Batch 1: median ms per call over rounds that alternate the variants; batch `--throughput-batch`: images/s.
Each variant's logits at batch `--check-batch` are compared with torch-folded fp32 by its precision's
default gate. `--device cpu` (a small model and batch) runs the code paths without a GPU, graphs left out.
"""

from __future__ import annotations

import argparse
import json
from datetime import date
from pathlib import Path

import numpy as np
import timm
import torch
from torch import nn

import vitfold
from vitfold.export import FILES
from vitfold.export.comparison import DEFAULT_TOLERANCES, compare
from vitfold.export.precision import at_precision
from vitfold.export.runners import CudaGraphRunner, Runner, open_runner
from vitfold.export.timing import interleaved_rounds, machine
from vitfold.pipeline.stages.backends import folded_model
from vitfold.pipeline.stages.rundir import RunDir

AOTI = {"fp32": "aoti", "fp16": "aoti-fp16", "bf16": "aoti-bf16"}


def random_folded(backbone: str) -> nn.Module:
    """`backbone` with random weights, RLRR-adapted with its tensors drawn away from the identity, folded."""
    torch.manual_seed(0)
    adapted = vitfold.adapt(timm.create_model(backbone), "rlrr", num_classes=100)
    with torch.no_grad():
        for p in adapted.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return vitfold.fold(adapted).eval()


def open_variants(folded: nn.Module, rd: RunDir | None, args: argparse.Namespace) -> dict[str, tuple[str, Runner]]:
    """name -> (precision, runner on the device); on CUDA each eager torch variant with a CUDA-graph twin."""
    runtimes, device = args.runtimes.split(","), args.device
    runners: dict[str, tuple[str, Runner]] = {}
    for precision in ("fp32", "fp16", "bf16"):
        if "torch" in runtimes:
            runners[f"torch-{precision}"] = (precision, open_runner("torch", at_precision(folded, precision), device))
        if "compiled" in runtimes and precision in args.compiled_precisions.split(","):
            model = at_precision(folded, precision).to(device)
            compiled = torch.compile(model, mode=args.compile_mode, dynamic=False)
            runners[f"compiled-{precision}"] = (precision, open_runner("torch", compiled, device))
        package = rd.export_dir / FILES[AOTI[precision]] if rd is not None else None
        if "aoti" in runtimes and package is not None and package.is_file():
            runners[f"aoti-{precision}"] = (precision, open_runner("aoti", package, device))
    graphs = {
        f"{name}+graph": (p, CudaGraphRunner(runner))
        for name, (p, runner) in runners.items()
        if name.startswith("torch-") and device.startswith("cuda")
    }
    return {**runners, **graphs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, nargs="?", help="a run exported on CUDA (or --random-model)")
    parser.add_argument("--random-model", metavar="BACKBONE", help="a folded RLRR model of random weights")
    parser.add_argument("--out", type=Path, default=Path("gpu_precision.json"))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--throughput-batch", type=int, default=256)
    parser.add_argument("--runtimes", default="torch,aoti", help="comma-separated: torch, compiled, aoti")
    parser.add_argument("--compile-mode", default="max-autotune", help="torch.compile's mode for runtime compiled")
    parser.add_argument("--compiled-precisions", default="fp16,bf16", help="comma-separated, for runtime compiled")
    parser.add_argument("--check-batch", type=int, default=8, help="the batch each variant's gate is checked on")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    if (args.run is None) == (args.random_model is None):
        parser.error("give a RUN or --random-model BACKBONE (one of them)")
    rd = RunDir(args.run) if args.run is not None else None
    folded = folded_model(rd) if rd is not None else random_folded(args.random_model)
    size = rd.image_size() if rd is not None else folded.patch_embed.img_size
    g = torch.Generator().manual_seed(0)
    x_check = torch.randn(args.check_batch, 3, *size, generator=g).to(args.device)
    with torch.no_grad():
        reference = folded.to(args.device)(x_check).float().cpu()
    variants = open_variants(folded, rd, args)
    results: dict[str, dict] = {}
    for name, (precision, runner) in list(variants.items()):
        try:  # the first call of a graph variant captures its graph
            check = compare(reference, runner(x_check).float().cpu(), DEFAULT_TOLERANCES[precision])
        except Exception as e:  # noqa: BLE001 - a variant that cannot run is reported, the others still timed
            results[name] = {"precision": precision, "error": f"{type(e).__name__}: {e}"}
            del variants[name]
            continue
        results[name] = {"precision": precision, "gate": check.to_dict()}
    for batch, key in ((1, "batch1"), (args.throughput_batch, f"batch{args.throughput_batch}")):
        x = torch.randn(batch, 3, *size, generator=g).to(args.device)
        iters = 20 if batch == 1 else 3
        calls = {name: (lambda r=runner, x=x: r(x)) for name, (_, runner) in variants.items()}
        rounds = interleaved_rounds(calls, warmup=3, iters=iters, rounds=args.rounds, device=args.device)
        for name, ms in rounds.items():
            median = float(np.median(ms))
            results[name][key] = {
                "median_ms": round(median, 4),
                "min_ms": round(float(np.min(ms)), 4),
                "max_ms": round(float(np.max(ms)), 4),
                "images_per_s": round(batch * 1e3 / median, 1),
            }
    summary = {
        "date": str(date.today()),
        "machine": machine(args.device),
        "torch": torch.__version__,
        "model": str(args.run) if rd is not None else f"{args.random_model} (random weights, RLRR folded)",
        "compile_mode": args.compile_mode if "compiled" in args.runtimes else None,
        "results": results,
    }
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
