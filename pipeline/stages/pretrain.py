"""The pretrain stage: pre-train a backbone inside the pipeline, for the offline demo (no hub weights exist offline).

`pretrain: {data: digits:0-4, train: {...}}` in a run config: the backbone is trained from scratch
(method `full`) on that data, its weights without the head are cached under VITFOLD_CACHE (default
~/.cache/vitfold/pretrained/) keyed by a hash of everything that decides them, and the run uses the
file as its `checkpoint`. A second run, or any run with the same backbone and pre-training, reuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from vitfold.errors import VitfoldError
from vitfold.pipeline.atomic import atomic_replace
from vitfold.pipeline.config import RunConfig, load_config
from vitfold.pipeline.stages.rundir import RunDir
from vitfold.pipeline.stages.stage import Context, Stage, StageResult, execute
from vitfold.pipeline.stages.train import TRAIN

PRETRAIN_KEYS = ("data", "train")


def cache_dir() -> Path:
    return Path(os.environ.get("VITFOLD_CACHE", Path.home() / ".cache" / "vitfold")) / "pretrained"


def pretrain_config(cfg: RunConfig) -> RunConfig:
    spec = cfg.pretrain or {}
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
    )


def pretrained_path(cfg: RunConfig) -> Path:
    """Where the backbone pre-trained as `cfg.pretrain` says is (or will be) cached."""
    spec: dict[str, Any] = pretrain_config(cfg).to_dict()
    spec = {k: spec[k] for k in ("backbone", "backbone_kwargs", "data", "method", "seed", "train")}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / f"{cfg.backbone}-{key}.safetensors"


def pretrain(cfg: RunConfig, log=print) -> Path:
    """The cached pre-trained backbone for `cfg`, training it first when it is not cached yet."""
    from safetensors.torch import load_file, save

    path = pretrained_path(cfg)
    if path.is_file():
        log(f"pre-trained backbone: {path} (cached)")
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    pre = pretrain_config(cfg)
    log(f"pre-training {cfg.backbone} on {pre.data} for {pre.train.epochs} epochs (cached in {path.parent})")
    work = Path(tempfile.mkdtemp(dir=path.parent, prefix=".pretrain-"))
    try:
        scratch = RunDir(work)
        result = execute(TRAIN, scratch, settings=pre, log=log)
        trained = load_file(scratch.adapter)  # method full: every weight
        state = {k: v for k, v in trained.items() if not k.startswith("head.")}
        meta = {"pretrained_on": pre.data, "epochs": str(pre.train.epochs), "eval_acc": str(result["best_acc"])}
        atomic_replace(path, save(state, metadata=meta))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return path


def _run(rd: RunDir, cfg: RunConfig, ctx: Context) -> StageResult:
    return StageResult([pretrain(cfg, log=ctx.log)])


PRETRAIN = Stage(
    "pretrain",
    settings=lambda cfg: cfg,
    inputs=lambda rd, cfg: [],
    run=_run,
    params=lambda cfg: {"pretrain": cfg.pretrain, "checkpoint": cfg.checkpoint},
)
