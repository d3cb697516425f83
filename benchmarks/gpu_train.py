"""GPU training throughput and peak memory per method: ViT-B/16 at 224, batch 64, bf16 autocast.

    python benchmarks/gpu_train.py [--backbone vit_base_patch16_224] [--batch-size 64] [--out gpu_train.json]
        [--compile-modes eager,default,reduce-overhead] [--fused]

Each method and compile mode: AdamW over the method's trainable parameters (`--fused`: AdamW's fused
kernel), the model eager or `torch.compile`d in that mode (reduce-overhead and max-autotune replay CUDA
graphs, which removes the per-kernel launch cost that makes eager RLRR slower: see docs/benchmarks.md),
5 warm-up steps, then `--steps` timed steps between synchronisations; peak memory:
torch.cuda.max_memory_allocated (timed steps). Each row's speed is also given against full fine-tuning's in
the same compile mode. `--device cpu` (with a small `--backbone` and `--batch-size`) runs every code path
without a GPU, to check the script before a device session.
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
MODES = ("eager", "default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")
GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the modes whose compiled model replays CUDA graphs


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(
    backbone: str, method: str, batch: int, steps: int, mode: str = "eager", fused: bool = False, device: str = "cuda"
) -> dict:
    torch.manual_seed(0)
    dev = torch.device(device)
    model = timm.create_model(backbone)
    adapted = vitfold.adapt(model, method, num_classes=100, **METHODS[method]).to(dev).train()
    params = [p for p in adapted.parameters() if p.requires_grad]
    compiled = adapted if mode == "eager" else torch.compile(adapted, mode=None if mode == "default" else mode)
    graphs = mode in GRAPH_MODES and dev.type == "cuda"
    step = training_step(compiled, params, batch, classes=100, fused=fused, graphs=graphs)

    start = time.perf_counter()
    for _ in range(5):
        step()
    synchronize(dev)
    warmup_s = time.perf_counter() - start
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(dev)
    seconds = time.perf_counter() - start
    return {
        "method": method,
        "options": METHODS[method],
        "mode": mode,
        "fused_adamw": fused,
        "trainable_params": sum(p.numel() for p in params),
        "img_per_s": round(batch * steps / seconds, 1),
        "warmup_s": round(warmup_s, 1),  # includes the compilation
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev.type == "cuda" else None,
    }  # the model and optimizer go with this frame; main() empties the cache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="vit_base_patch16_224")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--compile-modes", default="eager", help=f"comma-separated, of: {', '.join(MODES)}")
    ap.add_argument("--fused", action="store_true", help="AdamW's fused kernel (one launch for all tensors)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out")
    args = ap.parse_args()
    modes = args.compile_modes.split(",")
    if unknown := sorted(set(modes) - set(MODES)):
        ap.error(f"--compile-modes: unknown {', '.join(unknown)} (choose from {', '.join(MODES)})")
    methods = args.methods.split(",")
    if "full" not in methods:
        ap.error("--methods must include full (each row's speed is given against it)")
    rows = []
    for mode in modes:
        for method in methods:
            rows.append(measure(args.backbone, method, args.batch_size, args.steps, mode, args.fused, args.device))
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            torch._dynamo.reset()
    for r in rows:
        full = next(f for f in rows if f["method"] == "full" and f["mode"] == r["mode"])
        r["img_per_s_vs_full"] = round(r["img_per_s"] / full["img_per_s"], 3)
        if r["peak_memory_gib"] is not None:
            r["memory_vs_full"] = round(r["peak_memory_gib"] / full["peak_memory_gib"], 3)
        print(json.dumps(r))
    result = {
        "date": date.today().isoformat(),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
        "torch": torch.__version__,
        "backbone": args.backbone,
        "batch_size": args.batch_size,
        "dtype": "bf16" if args.device.startswith("cuda") else "fp32",
        "rows": rows,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
