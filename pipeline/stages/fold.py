"""The fold stage: RUN/train/adapter.safetensors + the base backbone -> RUN/fold/model.safetensors.

The output is a plain timm state_dict that timm loads with no vitfold code (the call is printed and
kept in the file's metadata as `load_with`, see `backbones.folded_load_call`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save

from vitfold.errors import VitfoldError
from vitfold.pipeline.adapting import load_adapter
from vitfold.pipeline.atomic import atomic_replace
from vitfold.pipeline.backbones import folded_load_call
from vitfold.pipeline.folding import fold
from vitfold.pipeline.models import build_model
from vitfold.pipeline.stages.manifest import verified_input
from vitfold.pipeline.stages.rundir import RunDir
from vitfold.pipeline.stages.stage import Context, Stage, StageResult


def _run(rd: RunDir, settings: dict[str, Any], ctx: Context) -> StageResult:
    cfg = rd.config
    adapter_path = verified_input(rd, rd.adapter, "train")
    meta = rd.metadata(adapter_path)
    if meta.get("method") != cfg.method:
        raise VitfoldError(
            f"{adapter_path} holds a '{meta.get('method')}' adapter, the run's config says '{cfg.method}'"
        )
    num_classes = int(meta["num_classes"])
    model = load_adapter(build_model(cfg, num_classes), load_file(adapter_path))
    plain = fold(model)  # refuses a non-finite adapter, naming the tensor
    metadata = {
        "format": "vitfold-folded/1",
        "backbone": cfg.backbone,
        "backbone_kwargs": json.dumps(cfg.backbone_kwargs),
        "num_classes": str(num_classes),
        "image_size": json.dumps([int(s) for s in plain.patch_embed.img_size]),
        "method": cfg.method,
        "load_with": folded_load_call(cfg.backbone, num_classes, rd.folded, cfg.backbone_kwargs),
    }
    tensors = {k: v.contiguous() for k, v in plain.state_dict().items()}
    atomic_replace(rd.folded, save(tensors, metadata=metadata))
    ctx.log(f"folded {cfg.method} into {rd.folded} (sha256 {rd.sha256(rd.folded)[:12]}…)")
    ctx.log(f"load it with: {metadata['load_with']}")
    return StageResult([rd.folded], value=rd.folded, extra={"num_classes": num_classes})


def _inputs(rd: RunDir, settings: dict[str, Any]) -> list[Path]:
    cfg = rd.config
    return [rd.adapter, *([Path(cfg.checkpoint)] if cfg.checkpoint else [])]


FOLD = Stage("fold", settings=lambda cfg: {}, inputs=_inputs, run=_run)
