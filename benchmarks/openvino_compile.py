"""Two ways of compiling the same OpenVINO IRs, side by side: latency per IR and batch size in interleaved
rounds, as ratios inside one run, and the cosine between the two ways' logits.

    python benchmarks/openvino_compile.py RUN/export/model.int8.xml RUN/export/model.bf16.xml \
        --compare shape --batch-sizes 1,8 --threads 2 --out docs/results/openvino_static_shapes.json
    python benchmarks/openvino_compile.py RUN/export/model.int8.xml --compare float-ops --batch-sizes 1,8

`--compare shape`: the batch axis dynamic (as written) against one fixed input shape (what the runner
does). `--compare float-ops`: the IR's float ops at INFERENCE_PRECISION_HINT f32 against bf16, both at a
fixed shape (for the INT8 IR the runner picks bf16 on a CPU with AMX, `float_ops_hint`). Every other
setting is the runner's (`compile_config`).
"""

from __future__ import annotations

import argparse
import json
import statistics
from datetime import date
from pathlib import Path

import numpy as np
import openvino as ov

from vitfold.export.openvino_runner import compile_config, ir_precision
from vitfold.export.timing import interleaved_rounds, machine

# comparison -> (the way it is measured against, the way it measures): name, static shape, precision hint
COMPARISONS = {
    "shape": (("dynamic", False, None), ("static", True, None)),
    "float-ops": (("f32", True, "f32"), ("bf16", True, "bf16")),
}


def infer_call(core: ov.Core, path: Path, batch: int, threads: int, static: bool, hint: str | None):
    """One infer request of the IR at `path`, compiled as the runner would (static: for this batch; `hint`:
    this INFERENCE_PRECISION_HINT instead of the runner's), and the batch it is called with."""
    model = core.read_model(str(path))
    size = [batch, *[d.get_length() for d in model.inputs[0].partial_shape[1:]]]
    if static:
        model.reshape({model.inputs[0]: size})
    config = compile_config(ir_precision(model), threads)
    if hint is not None:
        config["INFERENCE_PRECISION_HINT"] = hint
    request = core.compile_model(model, "CPU", config).create_infer_request()
    x = np.random.default_rng(0).standard_normal(size, dtype=np.float32)
    return lambda: request.infer({0: x})[0]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("irs", nargs="+", type=Path)
    ap.add_argument("--compare", choices=sorted(COMPARISONS), default="shape")
    ap.add_argument("--batch-sizes", default="1")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--iters", type=int, default=20, help="calls per variant per round")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    core = ov.Core()
    (base, *base_way), (new, *new_way) = COMPARISONS[args.compare]
    results = []
    for batch in map(int, args.batch_sizes.split(",")):
        variants = {
            f"{path.name} {name}": infer_call(core, path, batch, args.threads, *way)
            for path in args.irs
            for name, way in ((base, base_way), (new, new_way))
        }
        outputs = {name: call().copy() for name, call in variants.items()}
        samples = interleaved_rounds(variants, warmup=5, iters=args.iters, rounds=args.rounds)
        for path in args.irs:
            before, after = (np.array(samples[f"{path.name} {name}"]) for name in (base, new))
            ratios = before / after  # per round: > 1 where the second way is faster
            q25, q50, q75 = np.percentile(ratios, [25, 50, 75])
            row = {
                "ir": path.name,
                "batch_size": batch,
                f"{base}_ms": round(statistics.median(before), 3),
                f"{new}_ms": round(statistics.median(after), 3),
                f"speedup_{new}": round(float(q50), 4),
                "speedup_iqr": [round(float(q25), 4), round(float(q75), 4)],
                f"rounds_{new}_faster": int((ratios > 1).sum()),
                "cosine": round(cosine(outputs[f"{path.name} {base}"], outputs[f"{path.name} {new}"]), 7),
            }
            results.append(row)
            print(
                f"{row['ir']:<20} b{batch:<3} {base} {row[f'{base}_ms']:8.3f} ms  {new} {row[f'{new}_ms']:8.3f} ms  "
                f"x{q50:.3f} (IQR {q25:.3f}-{q75:.3f}), {new} faster in {row[f'rounds_{new}_faster']}/{args.rounds} "
                f"rounds, cosine {row['cosine']:.6f}"
            )
    if args.out:
        meta = {"date": date.today().isoformat(), "machine": machine(), "openvino": ov.__version__}
        settings = {"compare": args.compare, "threads": args.threads, "rounds": args.rounds, "iters": args.iters}
        args.out.write_text(json.dumps({**meta, **settings, "rows": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
