"""CPU latency per precision: the unmerged and folded model in torch, ONNX Runtime fp32 / int8 (static QDQ
and dynamic) and AOTInductor fp32 / bf16, in rounds that alternate the variants (issue 14's CPU targets).

    python benchmarks/precision_cpu.py [--backbone vit_small_patch16_224] [--batch 1] [--threads 2]
                                       [--rounds 10] [--iters 5] [--out precision.json]

A random backbone with a randomised RLRR adapter (speed does not depend on the weights; agreement on
real images is what `vitfold verify` gates). Each variant's logits on 8 random images are compared with
the folded model's in fp32 (cosine), the int8 files calibrated on 64 random images. Ratios are of medians
within this one run; the spread is the IQR of the per-round means over their median.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from datetime import date
from pathlib import Path

import numpy as np
import timm
import torch

import vitfold
from vitfold.export import FILES, export
from vitfold.export.aoti import export_aoti
from vitfold.export.int8 import quantize_onnx_int8
from vitfold.export.isa import cpu_has_bf16, cpu_isa, cpu_name
from vitfold.export.precision import at_precision
from vitfold.export.runners import open_runner
from vitfold.export.timing import interleaved_rounds


def adapted_model(backbone: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = vitfold.adapt(timm.create_model(backbone), "rlrr", num_classes=10)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    unmerged = adapted_model(args.backbone)
    folded = vitfold.fold(copy.deepcopy(unmerged)).eval()
    size = tuple(folded.patch_embed.img_size)
    g = torch.Generator().manual_seed(0)
    calibration = torch.randn(64, 3, *size, generator=g)
    check = torch.randn(8, 3, *size, generator=g)
    x = torch.randn(args.batch, 3, *size, generator=g)
    work = Path(tempfile.mkdtemp(prefix="precision-"))
    files = export(folded, work, ("onnx", "aoti"), (3, *size), "int8", calibration=calibration)
    dynamic = quantize_onnx_int8(files["onnx"], work / "model.int8-dynamic.onnx", None, mode="dynamic")
    runners = {
        "torch-unmerged fp32": open_runner("torch", unmerged),
        "torch-folded fp32": open_runner("torch", folded),
        "onnxruntime fp32": open_runner("onnxruntime", files["onnx"], threads=args.threads),
        "onnxruntime int8 static QDQ": open_runner("onnxruntime", files["onnx-int8"], threads=args.threads),
        "onnxruntime int8 dynamic": open_runner("onnxruntime", dynamic, threads=args.threads),
        "aoti fp32": open_runner("aoti", files["aoti"]),
    }
    if cpu_has_bf16():
        bf16_package = export_aoti(folded, work / FILES["aoti-bf16"], size, "cpu", "bf16")[0]
        runners["torch-folded bf16"] = open_runner("torch", at_precision(folded, "bf16"))
        runners["aoti bf16"] = open_runner("aoti", bf16_package)
    with torch.no_grad():
        reference = folded(check)
    cosine = {
        name: float(torch.nn.functional.cosine_similarity(r(check).float(), reference, dim=-1).min())
        for name, r in runners.items()
    }
    rounds = interleaved_rounds(
        {name: (lambda r=r: r(x)) for name, r in runners.items()}, warmup=3, iters=args.iters, rounds=args.rounds
    )
    median = {name: float(np.median(ms)) for name, ms in rounds.items()}
    rows = []
    for name, ms in rounds.items():
        q1, q3 = np.percentile(ms, [25, 75])
        rows.append(
            {
                "variant": name,
                "median_ms": round(median[name], 3),
                "rel_iqr": round(float((q3 - q1) / median[name]), 3),
                "vs_onnxruntime_fp32": round(median["onnxruntime fp32"] / median[name], 3),
                "vs_torch_unmerged": round(median["torch-unmerged fp32"] / median[name], 3),
                "cosine_min_vs_fp32": round(cosine[name], 6),
            }
        )
    summary = {
        "date": str(date.today()),
        "backbone": args.backbone,
        "batch": args.batch,
        "threads": args.threads,
        "cpu": cpu_name(),
        "isa": cpu_isa(),
        "torch": torch.__version__,
        "rounds": args.rounds,
        "iters_per_round": args.iters,
        "rows": rows,
    }
    print(f"{args.backbone}, batch {args.batch}, {args.threads} threads, {cpu_name()} ({', '.join(cpu_isa())})")
    print(f"{'variant':<30} {'median ms':>10} {'rel IQR':>8} {'x ORT fp32':>10} {'x unmerged':>10} {'cos min':>9}")
    for r in rows:
        print(
            f"{r['variant']:<30} {r['median_ms']:10.2f} {r['rel_iqr']:8.3f} {r['vs_onnxruntime_fp32']:10.2f} "
            f"{r['vs_torch_unmerged']:10.2f} {r['cosine_min_vs_fp32']:9.5f}"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="vit_small_patch16_224")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="torch, OpenMP (AOTInductor) and ONNX Runtime")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--out", default=None)
    main(parser.parse_args())
