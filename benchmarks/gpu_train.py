"""GPU training throughput and peak memory per method: ViT-B/16 at 224, batch 64, bf16 autocast.

    python benchmarks/gpu_train.py [--backbone vit_base_patch16_224] [--batch-size 64] [--out gpu_train.json]

Each method: AdamW over its trainable parameters (optionally `--compile`d), 5 warm-up steps, then
`--steps` timed steps between CUDA synchronisations; peak memory: torch.cuda.max_memory_allocated (timed steps).
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import date

import timm
import torch

import vitfold

from steps import training_step  # benchmarks/steps.py

METHODS = {"full": {}, "rlrr": {}, "efft2": {"rank": 32}, "lora": {"rank": 8}}


def measure(backbone: str, method: str, options: dict, batch: int, steps: int, compile_model: bool = False) -> dict:
    torch.manual_seed(0)
    adapted = vitfold.adapt(timm.create_model(backbone), method, num_classes=100, **options).cuda().train()
    params = [p for p in adapted.parameters() if p.requires_grad]
    model = torch.compile(adapted) if compile_model else adapted
    step = training_step(model, params, batch, classes=100)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = {
        "method": method,
        "options": options,
        "compiled": compile_model,
        "trainable_params": sum(p.numel() for p in params),
        "img_per_s": round(batch * steps / seconds, 1),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
    }
    return result  # the model and optimizer go with this frame; main() empties the cache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="vit_base_patch16_224")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--compile", action="store_true", help="torch.compile each model (fewer kernel launches)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out")
    args = ap.parse_args()
    rows = []
    for method in args.methods.split(","):
        rows.append(measure(args.backbone, method, METHODS[method], args.batch_size, args.steps, args.compile))
        torch.cuda.empty_cache()
    full = next(r for r in rows if r["method"] == "full")
    for r in rows:
        r["img_per_s_vs_full"] = round(r["img_per_s"] / full["img_per_s"], 3)
        r["memory_vs_full"] = round(r["peak_memory_gib"] / full["peak_memory_gib"], 3)
        print(json.dumps(r))
    result = {
        "date": date.today().isoformat(),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "backbone": args.backbone,
        "batch_size": args.batch_size,
        "dtype": "bf16",
        "rows": rows,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
