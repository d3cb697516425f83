"""Export time and artifact size per format for a folded model (random base, RLRR at random values).

python benchmarks/export_time.py [--backbone vit_base_patch16_224] [--formats onnx,torchscript,aoti] [--out r.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from datetime import date
from pathlib import Path

import timm
import torch

import vitfold
from vitfold.export import export


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="vit_base_patch16_224")
    ap.add_argument("--formats", default="onnx,torchscript,aoti")
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.manual_seed(0)
    adapted = vitfold.adapt(timm.create_model(args.backbone).eval(), "rlrr", num_classes=10)
    with torch.no_grad():
        for p in adapted.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    folded = vitfold.fold(adapted).eval()
    size = (3, *folded.patch_embed.img_size)
    rows = []

    def record(fmt: str, files: list[Path], seconds: float) -> None:
        rows.append(
            {
                "format": fmt,
                "seconds": round(seconds, 1),
                "megabytes": round(sum(f.stat().st_size for f in files) / 1e6, 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        export(folded, Path(tmp), args.formats.split(","), size, on_artifact=record)
    result = {
        "date": date.today().isoformat(),
        "backbone": args.backbone,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rows": rows,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
