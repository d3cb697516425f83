"""The fold stage: RUN/train/adapter.safetensors + the base backbone -> RUN/fold/model.safetensors and
RUN/fold/config.json.

The weights are a plain timm state_dict that timm loads with no vitfold code (the call is printed and
kept in the file's metadata as `load_with`, see `backbones.folded_load_call`). Beside them, config.json
(timm's `save_for_hf` format, `vitfold.pipeline.timm_config`) makes RUN/fold a timm model folder:
`timm.create_model("local-dir:RUN/fold", pretrained=True)` builds the folded model with the run's
backbone size, class names and data config (the evaluation transform training used).
"""

from __future__ import annotations

import json
from pathlib import Path

from vitfold.errors import VitfoldError
from vitfold.pipeline.adapting import load_adapter
from vitfold.pipeline.atomic import atomic_replace, atomic_write_json
from vitfold.pipeline.backbones import folded_load_call
from vitfold.pipeline.config import FoldConfig
from vitfold.pipeline.data import class_names, parse_data_spec
from vitfold.pipeline.folding import fold
from vitfold.pipeline.models import build_model, data_transform
from vitfold.pipeline.stages.manifest import verified_input
from vitfold.pipeline.stages.rundir import RunDir
from vitfold.pipeline.stages.stage import Context, Stage, StageResult
from vitfold.pipeline.stages.train import base_identity
from vitfold.pipeline.tensor_files import safetensors_bytes
from vitfold.pipeline.timm_config import label_names, timm_config


def _run(rd: RunDir, settings: FoldConfig, ctx: Context) -> StageResult:
    cfg = rd.config
    adapter_path = verified_input(rd, rd.adapter, "train")
    meta = rd.metadata(adapter_path)
    if meta.get("method") != cfg.method:
        raise VitfoldError(
            f"{adapter_path} holds a '{meta.get('method')}' adapter, the run's config says '{cfg.method}'"
        )
    trained_on, base = meta.get("base"), base_identity(rd, cfg)
    if trained_on is not None and trained_on != base and not settings.base_mismatch_ok:
        raise VitfoldError(
            f"{adapter_path} was trained on base weights {trained_on[:16]}, the run's backbone now has {base[:16]} "
            f"({cfg.checkpoint or cfg.backbone}): retrain, or fold anyway with --base-mismatch-ok"
        )
    num_classes = int(meta["num_classes"])
    model = load_adapter(build_model(cfg, num_classes), rd.tensors(adapter_path))
    plain = fold(model)  # refuses a non-finite adapter, naming the tensor
    metadata = {
        "format": "vitfold-folded/1",
        "backbone": cfg.backbone,
        "backbone_kwargs": json.dumps(cfg.backbone_kwargs),
        "num_classes": str(num_classes),
        "image_size": json.dumps([int(s) for s in plain.patch_embed.img_size]),
        "method": cfg.method,
        "load_with": folded_load_call(cfg.backbone, num_classes, rd.folded.resolve(), cfg.backbone_kwargs),
    }
    transform = data_transform(cfg, model)  # the transform training evaluated with
    names = class_names(parse_data_spec(cfg.data), transform, cfg.train.select == "best-val")
    config = timm_config(plain, cfg.backbone_kwargs, transform.data_config(), label_names(names, num_classes))
    atomic_replace(rd.folded, safetensors_bytes(plain.state_dict(), metadata))
    atomic_write_json(rd.folded_config, config)
    ctx.log(f"folded {cfg.method} into {rd.folded} (sha256 {rd.sha256(rd.folded)[:12]}…)")
    ctx.log(f"load it with: {metadata['load_with']}")
    local_dir = f'timm.create_model("local-dir:{rd.folded.parent}", pretrained=True)'
    ctx.log(f"or, with its class names and data config: {local_dir}")
    return StageResult([rd.folded, rd.folded_config], value=rd.folded, extra={"num_classes": num_classes})


def _inputs(rd: RunDir, settings: FoldConfig) -> list[Path]:
    cfg = rd.config
    return [rd.adapter, *([Path(cfg.checkpoint)] if cfg.checkpoint else [])]


FOLD = Stage("fold", section="fold", inputs=_inputs, run=_run)
