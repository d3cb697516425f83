"""The pretrain stage: pre-train a backbone inside the pipeline, for the offline demo (no hub weights exist offline).

`pretrain: {data: digits:0-4, train: {...}}` in a run config: the backbone is trained from scratch
(method `full`) on that data, its weights without the head are cached under VITFOLD_CACHE (default
~/.cache/vitfold/pretrained/) keyed by a hash of everything that decides them, and the run uses the
file as its `checkpoint`. A second run, or any run with the same backbone and pre-training, reuses it.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

from vitfold.errors import VitfoldError
from vitfold.pipeline.atomic import atomic_replace, atomic_write_text
from vitfold.pipeline.config import RunConfig, load_config
from vitfold.pipeline.stages.rundir import RunDir, sha256
from vitfold.pipeline.stages.stage import Context, Stage, StageResult, execute
from vitfold.pipeline.stages.trust import cache_root

PRETRAIN_KEYS = ("data", "train")


def cache_dir() -> Path:
    return cache_root() / "pretrained"


def pretrain_config(cfg: RunConfig, check: bool = True) -> RunConfig:
    spec = cfg.pretrain or {}
    if not isinstance(spec, dict):
        raise VitfoldError(f"config: pretrain must be a mapping, got {spec!r}")
    unknown = sorted(set(spec) - set(PRETRAIN_KEYS))
    if unknown or "data" not in spec:
        problem = f"unknown key '{unknown[0]}'" if unknown else "no 'data'"
        raise VitfoldError(f"config: pretrain takes 'data' and optionally 'train' ({problem})")
    return load_config(
        None,
        backbone=cfg.backbone,
        backbone_kwargs=cfg.backbone_kwargs,
        data=spec["data"],
        method="full",
        seed=cfg.seed,
        train=spec.get("train") or {},
        check=check,
    )


def pretrained_path(cfg: RunConfig) -> Path:
    """Where the backbone pre-trained as `cfg.pretrain` says is (or will be) cached: a file directly in the
    cache folder, whatever the backbone name holds (no path separator or `..` gets through)."""
    spec: dict[str, Any] = pretrain_config(cfg, check=False).to_dict()  # names a file: the run checks it
    spec = {k: spec[k] for k in ("backbone", "backbone_kwargs", "data", "method", "seed", "train")}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9_-]", "_", cfg.backbone)
    return cache_dir() / f"{name}-{key}.safetensors"


def _digest_file(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _cached(path: Path, log) -> bool:
    """The cached file is there and still has the sha256 recorded when it was made."""
    if not path.is_file():
        return False
    digest = _digest_file(path)
    if digest.is_file() and digest.read_text().strip() == sha256(path):
        return True
    log(f"{path}: its sha256 does not match {digest.name} (changed or incomplete): pre-training again")
    return False


def pretrain(cfg: RunConfig, log=print) -> Path:
    """The cached pre-trained backbone for `cfg`, training it first when it is not cached (or changed).
    An interrupted pre-training resumes from its last epoch (its scratch run lives beside the cache)."""
    from vitfold.pipeline.stages.train import TRAIN  # torch: only when there is something to train
    from vitfold.pipeline.tensor_files import safetensors_bytes

    path = pretrained_path(cfg)
    if _cached(path, log):
        log(f"pre-trained backbone: {path} (cached)")
        return path
    pre = pretrain_config(cfg)
    log(f"pre-training {cfg.backbone} on {pre.data} for {pre.train.total_epochs} epochs (cached in {path.parent})")
    scratch = RunDir(path.with_name(f".pretrain-{path.stem}"))
    with scratch.locked():
        result = execute(TRAIN, scratch, settings=pre, log=log, resume=True)
        trained = scratch.tensors(scratch.adapter)  # method full: every weight
        state = {k: v for k, v in trained.items() if not k.startswith("head.")}
        eval_acc = str(result["selected"]["eval_acc"])
        meta = {"pretrained_on": pre.data, "epochs": str(pre.train.total_epochs), "eval_acc": eval_acc}
        atomic_replace(path, safetensors_bytes(state, meta))
        atomic_write_text(_digest_file(path), sha256(path) + "\n")
    shutil.rmtree(scratch.path, ignore_errors=True)
    return path


def _run(rd: RunDir, cfg: RunConfig, ctx: Context) -> StageResult:
    return StageResult([pretrain(cfg, log=ctx.log)])


PRETRAIN = Stage(
    "pretrain",
    section=None,
    inputs=lambda rd, cfg: [],
    run=_run,
    params=lambda cfg: {"pretrain": cfg.pretrain, "checkpoint": cfg.checkpoint},
)
