"""The fold stage: RUN/train/adapter.safetensors + the base backbone -> RUN/fold/model.safetensors.

The output is a plain timm state_dict; timm loads it with no vitfold code:

    timm.create_model(name, pretrained=True, num_classes=N, **backbone_kwargs,
                      pretrained_cfg_overlay=dict(file="RUN/fold/model.safetensors", num_classes=N,
                                                  custom_load=False))

(`num_classes` belongs in the overlay too: otherwise timm drops a head whose size differs from the
pretrained config's; `custom_load=False`, or older timm releases (1.0.29 seen) read the file as the
original JAX `.npz` of `vit_*_patch16_224`.)
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import load_file, save

from pipeline.adapting import load_adapter
from pipeline.config import RunConfig, load_config
from pipeline.errors import VitfoldError
from pipeline.folding import fold
from pipeline.manifest import record_stage, verified_input
from pipeline.run import atomic_replace
from pipeline.train import build_model

FOLDED = Path("fold") / "model.safetensors"


def load_command(cfg: RunConfig, num_classes: int, path: Path) -> str:
    """The timm call that loads the folded checkpoint, as a user would type it."""
    kwargs = "".join(f", {k}={v!r}" for k, v in cfg.backbone_kwargs.items())
    return (
        f"timm.create_model({cfg.backbone!r}, pretrained=True, num_classes={num_classes}{kwargs}, "
        f"pretrained_cfg_overlay=dict(file={str(path)!r}, num_classes={num_classes}, custom_load=False))"
    )


def fold_stage(run_dir: Path, log=print) -> dict[str, Any]:
    """Fold the run's trained adapter into its base backbone; write and record fold/model.safetensors."""
    started = time.perf_counter()
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise VitfoldError(f"{run_dir} is not a run directory: {config_path} not found")
    cfg = load_config(config_path)
    adapter_path = verified_input(run_dir, run_dir / "train" / "adapter.safetensors", "train")
    with safe_open(adapter_path, "pt") as f:
        meta = f.metadata() or {}
    if meta.get("method") != cfg.method:
        raise VitfoldError(
            f"{adapter_path} holds a '{meta.get('method')}' adapter, the run's config says '{cfg.method}'"
        )
    num_classes = int(meta["num_classes"])
    model = load_adapter(build_model(cfg, num_classes), load_file(adapter_path))
    plain = fold(model)  # refuses a non-finite adapter, naming the tensor
    out = run_dir / FOLDED
    metadata = {
        "format": "vitfold-folded/1",
        "backbone": cfg.backbone,
        "backbone_kwargs": json.dumps(cfg.backbone_kwargs),
        "num_classes": str(num_classes),
        "method": cfg.method,
        "load_with": load_command(cfg, num_classes, out),
    }
    tensors = {k: v.contiguous() for k, v in plain.state_dict().items()}
    atomic_replace(out, save(tensors, metadata=metadata))
    inputs = [config_path, adapter_path] + ([Path(cfg.checkpoint)] if cfg.checkpoint else [])
    entry = record_stage(run_dir, "fold", inputs, [out], time.perf_counter() - started, num_classes=num_classes)
    log(f"folded {cfg.method} into {out} (sha256 {entry['outputs'][str(FOLDED)][:12]}…)")
    log(f"load it with: {metadata['load_with']}")
    return entry
