"""What a training step dispatches, per method: aten ops in the forward, the backward and the optimizer
step, and the step's time where that dispatch is all there is.

    python benchmarks/train_dispatch.py [--backbone vit_base_patch16_224] [--width 64] [--out train_dispatch.json]

The model is the backbone's graph (its depth, blocks and adapter placement) at `--width` channels on one
patch of 16x16 pixels, batch 2, one thread: its kernels are so small that a step's time is the cost of
dispatching its ops (Python, the dispatcher, autograd), which is what an eager step on a GPU pays the host
for each kernel it launches. AdamW runs with foreach=True, CUDA's default. The steps of the methods are
timed in interleaved rounds (`interleaved_rounds`); each method's speed is given against full
fine-tuning's in the same rounds, with the rounds' spread.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from datetime import date

import numpy as np
import timm
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import vitfold
from vitfold.export.timing import interleaved_rounds, machine

METHODS = {"full": {}, "rlrr": {}, "efft2": {"rank": 8}, "lora": {"rank": 8}}


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while it is active (views included: each is a dispatch)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's signature
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


class Proxy:
    """One method's dispatch-bound training setup: the adapted proxy model, its AdamW and a fixed batch."""

    def __init__(self, backbone: str, method: str, width: int) -> None:
        torch.manual_seed(0)
        model = timm.create_model(backbone, img_size=16, embed_dim=width, num_heads=4)
        self.model = vitfold.adapt(model, method, num_classes=10, **METHODS[method]).train()
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.trainable, lr=1e-4, foreach=True)
        self.x, self.y = torch.randn(2, 3, 16, 16), torch.randint(0, 10, (2,))  # [2, 3, 16, 16]: one patch each

    def loss(self) -> torch.Tensor:
        return nn.functional.cross_entropy(self.model(self.x), self.y)

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.loss().backward()
        self.opt.step()

    def op_counts(self) -> dict[str, dict]:
        """The ops of one step by phase: their total and the most frequent."""
        for _ in range(3):  # past the optimizer's state initialisation
            self.step()
        self.opt.zero_grad(set_to_none=True)
        with OpCounter() as forward:
            loss = self.loss()
        with OpCounter() as backward:
            loss.backward()
        with OpCounter() as optimizer:
            self.opt.step()
        phases = (("forward", forward), ("backward", backward), ("optimizer", optimizer))
        return {name: {"ops": sum(c.ops.values()), "top": dict(c.ops.most_common(6))} for name, c in phases}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="vit_base_patch16_224")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(1)
    steps, rows = {}, {}
    for method in METHODS:
        proxy = Proxy(args.backbone, method, args.width)
        rows[method] = {"trainable_tensors": len(proxy.trainable), **proxy.op_counts()}
        steps[method] = proxy.step
    rounds = interleaved_rounds(steps, warmup=5, iters=args.iters, rounds=args.rounds, round_warmup=2)
    full = np.array(rounds["full"])
    for method, ms in rounds.items():
        speed = full / np.array(ms)  # per round: full's step time over this method's
        rows[method]["step_ms"] = round(float(np.median(ms)), 3)
        rows[method]["speed_vs_full"] = round(float(np.median(speed)), 3)
        rows[method]["speed_vs_full_iqr"] = [round(float(q), 3) for q in np.percentile(speed, [25, 75])]
        ops = sum(rows[method][phase]["ops"] for phase in ("forward", "backward", "optimizer"))
        print(
            f"{method:6} ops fwd {rows[method]['forward']['ops']:5} bwd {rows[method]['backward']['ops']:5} "
            f"opt {rows[method]['optimizer']['ops']:4} (all {ops:5}); step {rows[method]['step_ms']:7.2f} ms, "
            f"{rows[method]['speed_vs_full']:.3f}x full's speed (IQR {rows[method]['speed_vs_full_iqr']})"
        )
    result = {
        "date": date.today().isoformat(),
        "machine": machine("cpu"),
        "torch": torch.__version__,
        "backbone": args.backbone,
        "proxy": {"width": args.width, "img_size": 16, "batch": 2, "threads": 1, "rounds": args.rounds},
        "methods": rows,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
