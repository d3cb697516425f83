"""Pre-train a backbone inside the pipeline, for the offline demo (no hub weights exist offline).

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

from pipeline.config import RunConfig, load_config
from pipeline.errors import VitfoldError
from pipeline.run import atomic_replace

PRETRAIN_KEYS = ("data", "train")


def cache_dir() -> Path:
    return Path(os.environ.get("VITFOLD_CACHE", Path.home() / ".cache" / "vitfold")) / "pretrained"


def pretrain_config(cfg: RunConfig) -> RunConfig:
    spec = cfg.pretrain or {}
    unknown = sorted(set(spec) - set(PRETRAIN_KEYS))
    if unknown or "data" not in spec:
        problem = f"unknown key '{unknown[0]}'" if unknown else "no 'data'"
        raise VitfoldError(f"config: pretrain takes 'data' and optionally 'train' ({problem})")
    return load_config(None, backbone=cfg.backbone, backbone_kwargs=cfg.backbone_kwargs, data=spec["data"],
                       method="full", seed=cfg.seed, train=spec.get("train") or {})  # fmt: skip


def pretrained_path(cfg: RunConfig) -> Path:
    """Where the backbone pre-trained as `cfg.pretrain` says is (or will be) cached."""
    spec: dict[str, Any] = pretrain_config(cfg).to_dict()
    spec = {k: spec[k] for k in ("backbone", "backbone_kwargs", "data", "method", "seed", "train")}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / f"{cfg.backbone}-{key}.safetensors"


def pretrain(cfg: RunConfig, log=print) -> Path:
    """The cached pre-trained backbone for `cfg`, training it first when it is not cached yet."""
    from safetensors.torch import load_file, save

    from pipeline.train import train

    path = pretrained_path(cfg)
    if path.is_file():
        log(f"pre-trained backbone: {path} (cached)")
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    pre = pretrain_config(cfg)
    log(f"pre-training {cfg.backbone} on {pre.data} for {pre.train.epochs} epochs (cached in {path.parent})")
    work = Path(tempfile.mkdtemp(dir=path.parent, prefix=".pretrain-"))
    try:
        result = train(pre, work, log=log)
        trained = load_file(work / "train" / "adapter.safetensors")  # method full: every weight
        state = {k: v for k, v in trained.items() if not k.startswith("head.")}
        meta = {"pretrained_on": pre.data, "epochs": str(pre.train.epochs), "eval_acc": str(result["best_acc"])}
        atomic_replace(path, save(state, metadata=meta))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return path
