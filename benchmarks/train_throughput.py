"""Training throughput (img/s) per method on the demo configuration, one epoch each.

    python benchmarks/train_throughput.py [--config demo] [--epochs 1] [--out results.json]

Reads img/s from each run's metrics (forward + backward + optimizer over the epoch, data in memory).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from datetime import date
from pathlib import Path

import torch

from vitfold.pipeline.adapting import parameter_counts
from vitfold.pipeline.config import load_config
from vitfold.pipeline.models import build_model
from vitfold.pipeline.stages import run_stage

METHODS = {
    "linear": {},
    "full": {},
    "lora": {"rank": 8},
    "rlrr": {"init": "paper"},
    "efft1": {"rank": 16},
    "efft2": {"rank": 16},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="demo")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--out")
    args = ap.parse_args()
    rows = []
    for method, options in METHODS.items():
        cfg = load_config(args.config, method=method, method_options=options, train={"epochs": args.epochs})
        with tempfile.TemporaryDirectory() as tmp:
            result = run_stage("train", Path(tmp), settings=cfg, log=lambda _: None)
        counts = parameter_counts(build_model(cfg, num_classes=5))
        rows.append(
            {
                "method": method,
                "img_per_s": result["img_per_s"],
                "trainable": counts["adapter_params"],
                "eval_acc": result["eval_acc"],
            }
        )
        print(f"{method:8s} {result['img_per_s']:8.1f} img/s   trainable {counts['adapter_params']:>9,}")
    report = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()} ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "config": args.config,
        "rows": rows,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
