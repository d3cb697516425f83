"""Where a training step's time goes: the top CUDA (or CPU) ops of one method's step, by self time.

python benchmarks/profile_step.py --method rlrr [--backbone vit_base_patch16_224] [--batch-size 64]
"""

from __future__ import annotations

import argparse

import timm
import torch
from torch.profiler import ProfilerActivity, profile

import vitfold

from steps import training_step  # benchmarks/steps.py


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="rlrr")
    ap.add_argument("--backbone", default="vit_base_patch16_224")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rows", type=int, default=15)
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    torch.manual_seed(0)
    model = vitfold.adapt(timm.create_model(args.backbone), args.method, num_classes=100).to(args.device).train()
    step = training_step(model, [p for p in model.parameters() if p.requires_grad], args.batch_size, classes=100)

    for _ in range(5):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(5):
            step()
        if cuda:
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(f"== {args.method}: top ops of 5 steps by {key}")
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
