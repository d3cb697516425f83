"""How far each backend is from this CPU's limit: achieved GFLOP/s of a backbone's forward against the
matmul peak measured here at the same threads and precision.

    python benchmarks/roofline.py --backbone vit_small_patch16_224 --batch-size 1 --threads 2 \
        [--onnx other.onnx ...] [--out roofline.json]

FLOPs per forward: `torch.utils.flop_counter.FlopCounterMode` on the model (attention on its math path,
so that its two matmuls are counted too). Variants, timed in rounds that alternate them (so drift hits
all alike; median over rounds of the mean per call): torch eager fp32; torch eager bf16 (weights and
activations, where the CPU has AVX512_BF16 or AMX); ONNX Runtime fp32 (CPU EP) on an ONNX exported here;
any ONNX given with --onnx (same FLOPs assumed, compared with the fp32 peak). The peaks are square matmuls
in the same rounds (torch.mm at n = 1024 and 2048, and ONNX Runtime MatMul for fp32): the best median
per precision is the peak that precision's rows are compared with.
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
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vitfold.export import export, open_runner
from vitfold.export.isa import cpu_isa
from vitfold.export.timing import interleaved_rounds, machine

MATMUL_SIZES = (1024, 2048)
BF16_ISA = ("AVX512_BF16", "AMX_BF16")


def forward_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward (a multiply-add counts 2), attention included (math path)."""
    with torch.inference_mode(), sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


def _torch_call(fn: Callable[..., object], *args: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.inference_mode():
            fn(*args)

    return run


def _onnx_call(path: Path, x: torch.Tensor, threads: int) -> Callable[[], None]:
    runner = open_runner("onnxruntime", path, "cpu", threads)
    x = runner.to_device(x)
    return lambda: runner(x)


def _onnx_matmul(n: int, threads: int) -> Callable[[], None]:
    """ONNX Runtime's own fp32 MatMul of two n x n matrices (its kernels, not torch's)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "matmul",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [n, n]) for name in ("a", "b")],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])],
    )
    # IR 9: what ONNX Runtime 1.30 reads too (it refuses IR 14, onnx 1.23's default)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(model.SerializeToString(), options, ["CPUExecutionProvider"])
    feeds = {name: np.random.default_rng(0).standard_normal((n, n), dtype=np.float32) for name in ("a", "b")}
    return lambda: session.run(None, feeds)


def _peaks(threads: int, bf16: bool) -> dict[str, tuple[str, float, Callable[[], None]]]:
    """name -> (precision, FLOPs per call, call) for the matmuls that measure the peak."""
    found: dict[str, tuple[str, float, Callable[[], None]]] = {}
    for n in MATMUL_SIZES:
        for precision, dtype in [("fp32", torch.float32), *([("bf16", torch.bfloat16)] if bf16 else [])]:
            a, b = (torch.randn(n, n, generator=torch.Generator().manual_seed(i)).to(dtype) for i in (0, 1))
            found[f"matmul torch {precision} n={n}"] = (precision, 2.0 * n**3, _torch_call(torch.mm, a, b))
        found[f"matmul onnxruntime fp32 n={n}"] = ("fp32", 2.0 * n**3, _onnx_matmul(n, threads))
    return found


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
    isa = cpu_isa()
    bf16 = any(name in isa for name in BF16_ISA)
    peaks = _peaks(args.threads, bf16)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export(model, Path(tmp), ["onnx"], size)["onnx"]
        variants: dict[str, tuple[str, Callable[[], None]]] = {"torch eager fp32": ("fp32", _torch_call(model, x))}
        if bf16:
            model_bf16 = timm.create_model(args.backbone, pretrained=False).eval()
            model_bf16.load_state_dict(model.state_dict())
            variants["torch eager bf16"] = ("bf16", _torch_call(model_bf16.to(torch.bfloat16), x.bfloat16()))
        variants["onnxruntime fp32 (CPU EP)"] = ("fp32", _onnx_call(onnx_path, x, args.threads))
        for path in args.onnx:
            variants[f"onnxruntime {path.name} (CPU EP)"] = ("fp32", _onnx_call(path, x, args.threads))
        calls = {name: call for name, (_, call) in variants.items()} | {n: p[2] for n, p in peaks.items()}
        samples = interleaved_rounds(calls, warmup=args.warmup, iters=args.iters, rounds=args.rounds)
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
