"""Where a training step's time goes: the top CUDA (or CPU) ops of one method's step, by self time.

python benchmarks/profile_step.py --method rlrr [--backbone vit_base_patch16_224] [--batch-size 64]
"""

from __future__ import annotations

import argparse

import timm
import torch
from torch.profiler import ProfilerActivity, profile

import pipeline


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
    model = pipeline.adapt(timm.create_model(args.backbone), args.method, num_classes=100).to(args.device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randn(args.batch_size, 3, *model.patch_embed.img_size, device=args.device)
    y = torch.randint(0, 100, (args.batch_size,), device=args.device)

    def step() -> None:
        with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=cuda):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

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
