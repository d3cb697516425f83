"""import-official: a checkpoint written by a paper's official code -> a run directory that `fold`, `export`
and `verify` take as if vitfold had trained it.

Writes RUN/config.yaml, RUN/import/backbone.safetensors when the checkpoint carries the backbone (it becomes
the run's `checkpoint`; otherwise the run's `--pretrained` or `--checkpoint` weights are the base) and
RUN/train/adapter.safetensors, and records them in the manifest as the train stage's outputs, with
`imported_from` (the official file and its sha256) in place of training. The key mapping:
`vitfold.pipeline.official`. A failed, interrupted or terminated import leaves nothing behind (not even
`.vitfold.lock` or `import/`): `removed_on_failure`.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from vitfold.errors import CheckpointError, VitfoldError
from vitfold.pipeline.adapting import load_adapter, save_adapter
from vitfold.pipeline.atomic import atomic_replace
from vitfold.pipeline.config import RunConfig, check_config, training_params
from vitfold.pipeline.models import build_model
from vitfold.pipeline.official import read_official
from vitfold.pipeline.stages.manifest import record_stage
from vitfold.pipeline.stages.rollback import removed_on_failure
from vitfold.pipeline.stages.rundir import RunDir, sha256
from vitfold.pipeline.stages.stage import Log
from vitfold.pipeline.stages.train import TRAIN, base_identity, run_adapter_metadata
from vitfold.pipeline.tensor_files import safetensors_bytes


def _check_base_weights(config: RunConfig, checkpoint: Path, carries_backbone: bool) -> None:
    """The base weights come from the checkpoint or from the config, never both, never neither."""
    chosen = config.checkpoint or config.pretrained
    if carries_backbone and chosen:
        raise VitfoldError(f"{checkpoint} carries its own backbone weights: drop --pretrained / --checkpoint")
    if not carries_backbone and not chosen:
        raise CheckpointError(
            f"{checkpoint} holds no backbone weights (the official RLRR code saves only the head, scale and shift "
            "tensors): pass --pretrained (the weights it started from, e.g. vit_base_patch16_224.orig_in21k) "
            "or --checkpoint PATH"
        )


def import_official(
    method: str, checkpoint: str | Path, run_dir: str | Path, config: RunConfig, log: Log = print
) -> Path:
    """Import the official `method` checkpoint into a new run directory with `config` (its backbone, data,
    and stage settings; `method_options` adds what the checkpoint lacks, EFFT2's `scale`). Returns the
    adapter file."""
    started = time.perf_counter()
    rd, checkpoint = RunDir(run_dir), Path(checkpoint)
    if rd.config_file.is_file() or rd.manifest_file.is_file():
        raise VitfoldError(f"{rd.path} already holds a run: import into a new directory")
    imported = read_official(method, checkpoint, config.method_options)
    _check_base_weights(config, checkpoint, bool(imported.backbone))
    options = {**imported.options, **config.method_options}
    cfg = replace(config, method=method, method_options=options, num_classes=imported.num_classes)
    check_config(cfg, where="import-official")
    with removed_on_failure(rd.path), rd.locked():  # a failure or a kill leaves nothing of the import behind
        if imported.backbone:
            meta = {"format": "vitfold-imported-backbone/1", "imported_from": str(checkpoint)}
            atomic_replace(rd.imported_backbone, safetensors_bytes(imported.backbone, meta))
            cfg = replace(cfg, checkpoint=str(rd.imported_backbone.resolve()))
        model = load_adapter(build_model(cfg, imported.num_classes), imported.adapter)
        rd.write_config(cfg)
        origin = {"path": str(checkpoint.resolve()), "sha256": sha256(checkpoint), "method": method}
        extra = {"base": base_identity(rd, cfg), "imported_from": origin["path"]}
        save_adapter(model, rd.adapter, backbone=cfg.backbone, **run_adapter_metadata(cfg, extra))
        seconds = time.perf_counter() - started
        record_stage(
            rd, "train", training_params(cfg), TRAIN.inputs(rd, cfg), [rd.adapter], seconds, imported_from=origin
        )
    log(
        f"imported the official {method} checkpoint {checkpoint} ({imported.depth} blocks, "
        f"{imported.num_classes} classes) into {rd.adapter}; next: vitfold fold {rd.path}"
    )
    return rd.adapter
