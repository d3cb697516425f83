"""OpenVINO IRs compiled with the batch axis dynamic (as written) against compiled for one fixed input shape
(what the runner does): latency per IR and batch size, in interleaved rounds, as ratios inside one run.

    python benchmarks/openvino_static_shapes.py RUN/export/model.int8.xml RUN/export/model.bf16.xml \
        --batch-sizes 1,8 --threads 2 --out docs/results/openvino_static_shapes.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from datetime import date
from pathlib import Path

import numpy as np
import openvino as ov

from vitfold.export.openvino import PRECISION_HINTS
from vitfold.export.openvino_runner import compile_config, ir_precision
from vitfold.export.timing import interleaved_rounds, machine


def infer_call(core: ov.Core, path: Path, batch: int, threads: int, static: bool):
    """One infer request of the IR at `path`, compiled as the runner would (static: for this batch)."""
    model = core.read_model(str(path))
    precision = ir_precision(model)
    size = [batch, *[d.get_length() for d in model.inputs[0].partial_shape[1:]]]
    if static:
        model.reshape({model.inputs[0]: size})
    request = core.compile_model(model, "CPU", compile_config(precision, threads)).create_infer_request()
    x = np.random.default_rng(0).standard_normal(size, dtype=np.float32)
    return lambda: request.infer({0: x})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("irs", nargs="+", type=Path)
    ap.add_argument("--batch-sizes", default="1")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--iters", type=int, default=20, help="calls per variant per round")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    core = ov.Core()
    results = []
    for batch in map(int, args.batch_sizes.split(",")):
        variants = {
            f"{path.name} {'static' if static else 'dynamic'}": infer_call(core, path, batch, args.threads, static)
            for path in args.irs
            for static in (False, True)
        }
        samples = interleaved_rounds(variants, warmup=5, iters=args.iters, rounds=args.rounds)
        for path in args.irs:
            dynamic, static = (np.array(samples[f"{path.name} {kind}"]) for kind in ("dynamic", "static"))
            ratios = dynamic / static  # per round: > 1 where the static compile is faster
            q25, q50, q75 = np.percentile(ratios, [25, 50, 75])
            row = {
                "ir": path.name,
                "batch_size": batch,
                "dynamic_ms": round(statistics.median(dynamic), 3),
                "static_ms": round(statistics.median(static), 3),
                "speedup_static": round(float(q50), 4),
                "speedup_iqr": [round(float(q25), 4), round(float(q75), 4)],
                "rounds_static_faster": int((ratios > 1).sum()),
            }
            results.append(row)
            print(
                f"{row['ir']:<20} b{batch:<3} dynamic {row['dynamic_ms']:8.3f} ms  static {row['static_ms']:8.3f} ms  "
                f"x{row['speedup_static']:.3f} (IQR {row['speedup_iqr'][0]:.3f}-{row['speedup_iqr'][1]:.3f}), "
                f"static faster in {row['rounds_static_faster']}/{args.rounds} rounds"
            )
    if args.out:
        meta = {"date": date.today().isoformat(), "machine": machine(), "openvino": ov.__version__}
        settings = {"threads": args.threads, "rounds": args.rounds, "iters": args.iters, "hints": PRECISION_HINTS}
        args.out.write_text(json.dumps({**meta, **settings, "rows": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
