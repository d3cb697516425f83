"""The compare stage: the same data, backbone and seed, trained with other methods, for the report's
accuracy table (the papers' table shape: method, trainable parameters, accuracy).

`compare: {linear: {}, full: {train: {lr: 5e-4}}, efft2: {method_options: {rank: 8}}}` in a run config:
each method trains into RUN/compare/<method>/ (its own run directory, resumable), and
RUN/compare/compare.json lists every method's result with the main run's method first.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from vitfold.errors import VitfoldError
from vitfold.pipeline.atomic import atomic_write_json
from vitfold.pipeline.config import RunConfig, load_config, training_params
from vitfold.pipeline.stages.rundir import RunDir
from vitfold.pipeline.stages.stage import Context, Stage, StageResult, execute
from vitfold.pipeline.stages.train import TRAIN

ENTRY_KEYS = ("method_options", "train")


def method_config(cfg: RunConfig, method: str, entry: dict[str, Any]) -> RunConfig:
    """The run's training config with `method` and the entry's options and training overrides."""
    unknown = sorted(set(entry or {}) - set(ENTRY_KEYS))
    if unknown:
        raise VitfoldError(f"config: compare.{method}: unknown key '{unknown[0]}' (known: {', '.join(ENTRY_KEYS)})")
    entry = entry or {}
    return load_config(
        None,
        backbone=cfg.backbone,
        backbone_kwargs=cfg.backbone_kwargs,
        checkpoint=cfg.checkpoint,
        pretrained=cfg.pretrained,
        data=cfg.data,
        method=method,
        num_classes=cfg.num_classes,
        seed=cfg.seed,
        method_options=entry.get("method_options") or {},
        train={**cfg.to_dict()["train"], **(entry.get("train") or {})},
    )


def run_result(rd: RunDir, cfg: RunConfig) -> dict[str, Any]:
    """Method, trainable parameter counts and best evaluation accuracy of a finished training run."""
    from vitfold.pipeline.adapting import parameter_counts
    from vitfold.pipeline.models import build_model

    with open(rd.metrics) as f:
        accuracies = [float(r["eval_acc"]) for r in csv.DictReader(f) if r["eval_acc"] != ""]
    counts = parameter_counts(build_model(cfg, rd.num_classes))
    return {
        "method": cfg.method,
        "method_options": cfg.method_options,
        "seed": cfg.seed,
        "epochs": cfg.train.epochs,
        "lr": cfg.train.lr,
        "adapter_params": counts["adapter_params"],
        "head_params": counts["head_params"],
        "trainable_params": counts["adapter_params"] + counts["head_params"],
        "backbone_params": counts["backbone_params"],
        "best_acc": max(accuracies),
        "final_acc": accuracies[-1],
        "run": str(rd.path),
    }


def _run(rd: RunDir, cfg: RunConfig, ctx: Context) -> StageResult:
    """Train every comparison method (resuming unfinished ones); write compare/compare.json."""
    results = [run_result(rd, cfg)]
    for method, entry in cfg.compare.items():
        if method == cfg.method:
            continue
        sub_cfg = method_config(cfg, method, entry)
        sub = RunDir(rd.compare_dir / method)
        same = sub.config_file.is_file() and sub.config_file.read_text() == sub_cfg.to_yaml()
        sub.write_config(sub_cfg)
        ctx.log(f"compare: training {method}")
        execute(TRAIN, sub, settings=sub_cfg, log=ctx.log, resume=same)
        results.append(run_result(sub, sub_cfg))
    atomic_write_json(rd.compare_summary, results)
    for r in results:
        ctx.log(f"compare: {r['method']:7s} {r['trainable_params']:>10,} trainable  best acc {r['best_acc']:.3f}")
    return StageResult([rd.compare_summary], value=results)


def _params(cfg: RunConfig) -> dict[str, Any]:
    """The training settings less the method (each compared method has its own), and the methods."""
    shared = {k: v for k, v in training_params(cfg).items() if k not in ("method", "method_options")}
    return {**shared, "compare": cfg.compare}


def _inputs(rd: RunDir, cfg: RunConfig) -> list[Path]:
    return [rd.metrics, *([Path(cfg.checkpoint)] if cfg.checkpoint else [])]


COMPARE = Stage("compare", section=None, inputs=_inputs, run=_run, params=_params)
