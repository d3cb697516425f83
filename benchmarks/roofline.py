"""How far each backend is from this CPU's limit: achieved GFLOP/s of a backbone's forward against the
matmul peak measured here at the same threads and precision.

    python benchmarks/roofline.py --backbone vit_small_patch16_224 --batch-size 1 --threads 2 \
        [--onnx other.onnx ...] [--out roofline.json]

FLOPs per forward: `torch.utils.flop_counter.FlopCounterMode` on the model (attention on its math path, so
that its two matmuls are counted too). Variants, timed in rounds that alternate them (so drift hits all alike;
median over rounds of the mean per call, each turn after one untimed call): torch eager fp32; torch eager bf16
(weights and activations, where the CPU has AVX512_BF16 or AMX); ONNX Runtime fp32 (CPU EP) on an ONNX
exported here; any ONNX given with --onnx (same FLOPs assumed, compared with the fp32 peak). The peaks are
square matmuls in the same rounds (`vitfold.export.roofline.peak_variants`: torch.mm at n = 1024 and 2048,
ONNX Runtime's MatMul for fp32 and MatMulInteger for int8, and OpenVINO's in each precision where it is
installed): the best median per precision is the peak that precision's rows are compared with.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from collections.abc import Callable
from datetime import date
from pathlib import Path

import numpy as np
import timm
import torch

from vitfold.export import export, open_runner
from vitfold.export.isa import cpu_has_bf16
from vitfold.export.roofline import forward_flops, peak_variants, torch_call
from vitfold.export.timing import interleaved_rounds, machine

__all__ = ["forward_flops", "main"]


def _onnx_call(path: Path, x: torch.Tensor, threads: int) -> Callable[[], None]:
    runner = open_runner("onnxruntime", path, "cpu", threads)
    x = runner.to_device(x)
    return lambda: runner(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="vit_small_patch16_224")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--onnx", type=Path, action="append", default=[], help="another ONNX of the same model")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(args.backbone, pretrained=False).eval()
    size = (3, *model.patch_embed.img_size)
    x = torch.randn(args.batch_size, *size, generator=torch.Generator().manual_seed(0))
    flops = forward_flops(model, x)
    bf16 = cpu_has_bf16()
    peaks = peak_variants(args.threads, bf16)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export(model, Path(tmp), ["onnx"], size)["onnx"]
        variants: dict[str, tuple[str, Callable[[], None]]] = {"torch eager fp32": ("fp32", torch_call(model, x))}
        if bf16:
            model_bf16 = timm.create_model(args.backbone, pretrained=False).eval()
            model_bf16.load_state_dict(model.state_dict())
            variants["torch eager bf16"] = ("bf16", torch_call(model_bf16.to(torch.bfloat16), x.bfloat16()))
        variants["onnxruntime fp32 (CPU EP)"] = ("fp32", _onnx_call(onnx_path, x, args.threads))
        for path in args.onnx:
            variants[f"onnxruntime {path.name} (CPU EP)"] = ("fp32", _onnx_call(path, x, args.threads))
        calls = {name: call for name, (_, call) in variants.items()} | {n: p[2] for n, p in peaks.items()}
        samples = interleaved_rounds(calls, warmup=args.warmup, iters=args.iters, rounds=args.rounds, round_warmup=1)
    work = {name: (precision, flops) for name, (precision, _) in variants.items()} | {
        name: (precision, per_call) for name, (precision, per_call, _) in peaks.items()
    }
    rate = {name: per_call / statistics.median(samples[name]) / 1e6 for name, (_, per_call) in work.items()}
    peak = {
        precision: max(rate[n] for n, (p, _, _) in peaks.items() if p == precision)
        for precision, _, _ in peaks.values()
    }
    rows = []
    for name, (precision, _) in work.items():
        q25, q75 = np.percentile(samples[name], [25, 75])
        rows.append(
            {
                "variant": name,
                "precision": precision,
                "median_ms": round(statistics.median(samples[name]), 3),
                "rounds_iqr_ms": [round(float(q25), 3), round(float(q75), 3)],
                "gflop_per_s": round(rate[name], 1),
                "peak_gflop_per_s": round(peak[precision], 1),
                "of_peak": round(rate[name] / peak[precision], 3),
            }
        )
    result = {
        "date": date.today().isoformat(),
        "backbone": args.backbone,
        "batch_size": args.batch_size,
        "image_size": list(size[1:]),
        "gflop_per_forward": round(flops / 1e9, 3),
        "threads": args.threads,
        "machine": machine(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "rounds": args.rounds,
        "iters": args.iters,
        "rows": rows,
    }
    print(_markdown(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


def _markdown(result: dict) -> str:
    found = result["machine"]
    lines = [
        f"{result['backbone']} {'x'.join(map(str, result['image_size']))}, batch {result['batch_size']}: "
        f"{result['gflop_per_forward']} GFLOP per forward; {result['threads']} threads; {found['cpu']} "
        f"({' '.join(found['cpu_isa'])}; torch dispatches {result['torch_cpu_capability']}); {result['date']}",
        "",
        "| variant | precision | median ms | rounds IQR ms | GFLOP/s | peak GFLOP/s | % of peak |",
        "|---|---|--:|--:|--:|--:|--:|",
    ]
    for r in result["rows"]:
        iqr = "–".join(f"{v:.3f}" for v in r["rounds_iqr_ms"])
        lines.append(
            f"| {r['variant']} | {r['precision']} | {r['median_ms']:.3f} | {iqr} | {r['gflop_per_s']:.1f} "
            f"| {r['peak_gflop_per_s']:.1f} | {r['of_peak']:.0%} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
