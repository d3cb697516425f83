"""import-official: a checkpoint written by a paper's official code -> a run directory that `fold`, `export`
and `verify` take as if vitfold had trained it.

Writes RUN/config.yaml, RUN/import/backbone.safetensors when the checkpoint carries the backbone (it becomes
the run's `checkpoint`; otherwise the run's `--pretrained` or `--checkpoint` weights are the base) and
RUN/train/adapter.safetensors, and records them in the manifest as the train stage's outputs, with
`imported_from` (the official file and its sha256) in place of training (`imported_run`). The key mapping:
`vitfold.pipeline.official`. A failed, interrupted or terminated import leaves nothing behind (not even
`.vitfold.lock` or `import/`).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from vitfold.errors import CheckpointError, VitfoldError
from vitfold.pipeline.config import RunConfig, check_config
from vitfold.pipeline.official import read_official
from vitfold.pipeline.stages.imported_run import new_run, write_imported_run
from vitfold.pipeline.stages.rundir import sha256
from vitfold.pipeline.stages.stage import Log


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
    rd, checkpoint = new_run(run_dir), Path(checkpoint)
    imported = read_official(method, checkpoint, config.method_options)
    _check_base_weights(config, checkpoint, bool(imported.backbone))
    options = {**imported.options, **config.method_options}
    cfg = replace(config, method=method, method_options=options, num_classes=imported.num_classes)
    check_config(cfg, where="import-official")
    origin = {"path": str(checkpoint.resolve()), "sha256": sha256(checkpoint), "method": method}
    write_imported_run(rd, cfg, imported.adapter, origin, started, backbone=imported.backbone)
    for note in imported.notes:
        log(f"import-official: {note}")
    log(
        f"imported the official {method} checkpoint {checkpoint} ({imported.depth} blocks, "
        f"{imported.num_classes} classes) into {rd.adapter}; next: vitfold fold {rd.path}"
    )
    return rd.adapter
