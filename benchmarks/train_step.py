"""Training-step and inference timings: RLRR and EFFT2 vs full fine-tuning vs the frozen forward, and
the folded model vs a fresh timm model of the same configuration.

    python benchmarks/train_step.py --backbone vit_base_patch16_224 --batch-size 8 --out bench.json
    python benchmarks/train_step.py --backbone swin_base_patch4_window7_224 --batch-size 1 --out swinb-b1.json

Timing: warm-up, then rounds that alternate the variants (so drift hits all alike); each round times
`--iters` calls with perf_counter after a CUDA synchronise. Reports the median per call, in ms.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from collections.abc import Callable
from datetime import date

import timm
import torch

import vitfold
from vitfold.export.timing import interleaved_rounds, machine

from steps import training_step  # benchmarks/steps.py


def _forward(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    model.eval()

    def run() -> None:
        with torch.inference_mode():
            model(x)

    return run


def _time(variants: dict[str, Callable[[], None]], device: torch.device, warmup: int, iters: int, rounds: int) -> dict:
    samples = interleaved_rounds(variants, warmup=warmup, iters=iters, rounds=rounds, device=str(device))
    return {name: {"median_ms": statistics.median(s), "min_ms": min(s), "rounds": s} for name, s in samples.items()}


def _step(model: torch.nn.Module, batch: int, classes: int) -> Callable[[], None]:
    model.train()
    return training_step(model, [p for p in model.parameters() if p.requires_grad], batch, classes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="vit_small_patch16_224")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--efft-rank", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    base = timm.create_model(args.backbone, num_classes=args.num_classes).to(device)
    size = base.patch_embed.img_size
    x = torch.randn(args.batch_size, 3, *size, device=device)

    full = copy.deepcopy(base)
    rlrr = vitfold.adapt(copy.deepcopy(base), "rlrr", num_classes=args.num_classes)
    efft2 = vitfold.adapt(copy.deepcopy(base), "efft2", num_classes=args.num_classes, rank=args.efft_rank)
    train = _time(
        {
            "full fine-tuning step": _step(full, args.batch_size, args.num_classes),
            "rlrr step": _step(rlrr, args.batch_size, args.num_classes),
            f"efft2 r{args.efft_rank} step": _step(efft2, args.batch_size, args.num_classes),
            "frozen forward": _forward(base, x),
        },
        device,
        args.warmup,
        args.iters,
        args.rounds,
    )
    del full, efft2
    folded = vitfold.fold(rlrr)
    fresh = timm.create_model(args.backbone, num_classes=args.num_classes).to(device)
    infer = _time(
        {
            "fresh timm forward": _forward(fresh, x),
            "folded forward": _forward(folded, x),
            "unmerged rlrr forward": _forward(rlrr, x),
        },
        device,
        args.warmup,
        args.iters * 2,
        args.rounds,
    )
    t = {**train, **infer}
    result = {
        "date": date.today().isoformat(),
        "machine": {**machine(args.device), "threads": torch.get_num_threads()},
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "backbone": args.backbone,
        "batch_size": args.batch_size,
        "timings": t,
        "ratios": {
            "rlrr_step / full_step": t["rlrr step"]["median_ms"] / t["full fine-tuning step"]["median_ms"],
            "rlrr_step / frozen_forward": t["rlrr step"]["median_ms"] / t["frozen forward"]["median_ms"],
            "efft2_step / full_step": t[f"efft2 r{args.efft_rank} step"]["median_ms"]
            / t["full fine-tuning step"]["median_ms"],
            "efft2_step / rlrr_step": t[f"efft2 r{args.efft_rank} step"]["median_ms"] / t["rlrr step"]["median_ms"],
            "folded / fresh": t["folded forward"]["median_ms"] / t["fresh timm forward"]["median_ms"],
            "unmerged / folded": t["unmerged rlrr forward"]["median_ms"] / t["folded forward"]["median_ms"],
        },
    }
    print(f"{args.backbone}, batch {args.batch_size}, {result['device']}, {result['machine']}")
    for name, v in t.items():
        spread = f"{min(v['rounds']):.1f}-{max(v['rounds']):.1f}"
        print(f"  {name:24s} {v['median_ms']:9.1f} ms  (rounds {spread})")
    for name, v in result["ratios"].items():
        print(f"  {name:28s} {v:.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
