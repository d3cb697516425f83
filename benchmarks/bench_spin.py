"""Why interleaved millisecond rows scatter: what ONNX Runtime's spinning threads and the switch between
backends cost the backend that runs next, measured as ratios inside one interleaved run (robust to load).

    python benchmarks/bench_spin.py [--backbone vit_tiny_patch16_224 --img-size 16 --patch-size 4 --depth 4]
        [--threads 2] [--rounds 20] [--calls 20] [--out spin.json]

One model (random weights), exported to ONNX. Each round runs, in this order, with no pause:

    ort spin     ONNX Runtime, intra-op threads spinning after each call (its default)
    torch a      torch eager, the same model
    ort no-spin  ONNX Runtime, `session.intra_op.allow_spinning = 0`
    torch b      torch eager again

each `--calls` calls, every call timed alone (`vitfold.export.timing.Timing` with no untimed call per round).
Reported, as medians over rounds with their IQR: torch a / torch b (what ONNX Runtime's spinning costs the
backend after it), the first call of a round over the median of its other calls (what the switch costs the
first call), ORT spin / ORT no-spin (what spinning gains ONNX Runtime itself), and the rounds' rel IQR of
each row's per-round means with and without its first call.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import timm
import torch

from vitfold.export import export, open_runner
from vitfold.export.timing import Timing, machine, round_spread


def _iqr(values: list[float]) -> list[float]:
    return [round(float(v), 3) for v in np.percentile(values, [25, 50, 75])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="vit_tiny_patch16_224")
    ap.add_argument("--img-size", type=int, default=16)
    ap.add_argument("--patch-size", type=int, default=4)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    kwargs = {"img_size": args.img_size, "patch_size": args.patch_size, "depth": args.depth}
    model = timm.create_model(args.backbone, pretrained=False, **kwargs).eval()
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    with tempfile.TemporaryDirectory() as tmp:
        onnx = export(model, Path(tmp), ["onnx"], (3, args.img_size, args.img_size))["onnx"]
        spin = open_runner("onnxruntime", onnx, "cpu", args.threads, spin=True)
        quiet = open_runner("onnxruntime", onnx, "cpu", args.threads, spin=False)
        eager = open_runner("torch", model, "cpu")
        cases = {"ort spin": (spin, x), "torch a": (eager, x), "ort no-spin": (quiet, x), "torch b": (eager, x)}
        timing = Timing(min_iters=args.calls * args.rounds, min_seconds=0.0, rounds=args.rounds, round_warmup=0)
        times = timing.measure(cases)
    median = {k: np.array([np.median(r[1:]) for r in rounds]) for k, rounds in times.items()}
    first = {k: [r[0] / np.median(r[1:]) for r in rounds] for k, rounds in times.items()}
    result = {
        "machine": machine(),
        "torch": torch.__version__,
        "model": {"backbone": args.backbone, **kwargs, "batch_size": args.batch_size},
        "threads": args.threads,
        "rounds": args.rounds,
        "calls_per_round": args.calls,
        "ratios_q25_q50_q75": {
            "torch after ORT spinning / torch after ORT not spinning": _iqr(median["torch a"] / median["torch b"]),
            "ORT spinning / ORT not spinning": _iqr(median["ort spin"] / median["ort no-spin"]),
            **{f"first call / the round's other calls: {k}": _iqr(v) for k, v in first.items()},
        },
        "rounds_rel_iqr": {
            k: {"all calls": round(round_spread(r), 4), "without the first": round(round_spread([c[1:] for c in r]), 4)}
            for k, r in times.items()
        },
        "median_ms": {k: round(float(np.median(v)), 3) for k, v in median.items()},
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
