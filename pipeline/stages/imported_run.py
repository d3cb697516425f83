"""A run directory written from imported adapter tensors (import-official, import-peft) instead of training.

Writes RUN/config.yaml, RUN/train/adapter.safetensors and, when the import carries the backbone,
RUN/import/backbone.safetensors (it becomes the run's `checkpoint`), and records them in the manifest as the
train stage's outputs with `imported_from` (the source and its sha256) in place of training, so `fold`,
`export` and `verify` take the run as if vitfold had trained it. All or nothing.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from vitfold.errors import VitfoldError
from vitfold.pipeline.adapting import load_adapter, save_adapter
from vitfold.pipeline.atomic import atomic_replace
from vitfold.pipeline.config import RunConfig, training_params
from vitfold.pipeline.models import build_model
from vitfold.pipeline.stages.manifest import record_stage
from vitfold.pipeline.stages.rollback import removed_on_failure
from vitfold.pipeline.stages.rundir import RunDir
from vitfold.pipeline.stages.train import TRAIN, base_identity, run_adapter_metadata
from vitfold.pipeline.tensor_files import safetensors_bytes


def new_run(run_dir: str | Path) -> RunDir:
    """`run_dir` as the RunDir of a new run; a `VitfoldError` when it already holds one."""
    rd = RunDir(run_dir)
    if rd.config_file.is_file() or rd.manifest_file.is_file():
        raise VitfoldError(f"{rd.path} already holds a run: import into a new directory")
    return rd


def write_imported_run(
    rd: RunDir,
    cfg: RunConfig,
    adapter: dict[str, torch.Tensor],
    origin: dict[str, Any],
    started: float,
    backbone: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write the run `rd` of `cfg` (its method, options and `num_classes` those of `adapter`, vitfold's names)
    from `origin` ({"path", "sha256", ...}, recorded as `imported_from`); `backbone`: timm tensors that become
    the run's base weights (its `checkpoint`, in place of --pretrained). `started`: the import's perf_counter
    start. A failure, Ctrl-C or SIGTERM leaves none of its files (`removed_on_failure`)."""
    with removed_on_failure(rd.path), rd.locked():  # a failure or a kill leaves nothing of the import behind
        if backbone:
            meta = {"format": "vitfold-imported-backbone/1", "imported_from": origin["path"]}
            atomic_replace(rd.imported_backbone, safetensors_bytes(backbone, meta))
            cfg = replace(cfg, checkpoint=str(rd.imported_backbone.resolve()), pretrained=False)
        model = load_adapter(build_model(cfg, cfg.num_classes), adapter)
        rd.write_config(cfg)
        extra = {"base": base_identity(rd, cfg), "imported_from": origin["path"]}
        save_adapter(model, rd.adapter, backbone=cfg.backbone, **run_adapter_metadata(cfg, extra))
        seconds = time.perf_counter() - started
        record_stage(
            rd, "train", training_params(cfg), TRAIN.inputs(rd, cfg), [rd.adapter], seconds, imported_from=origin
        )
