"""The compare stage: the same data and backbone, trained with other methods over several seeds, for the
report's accuracy table (the papers' table shape: method, trainable parameters, accuracy, here as
mean ± std over `seeds`, so a reader sees which differences are noise).

`compare: {linear: {}, full: {train: {lr: 5e-4}}, efft2: {method_options: {rank: 8}}}` and
`seeds: [0, 1, 2]` in a run config: each method trains with each seed into RUN/compare/<method>/seed-<s>/
(its own run directory, resumable; the run itself stands for its own method and seed when it trained with
the same settings; an entry for the run's own method, e.g. `rlrr: {train: {epochs: 4}}`, compares it with
other training settings, as the other methods' entries do), and
RUN/compare/compare.json lists every method's runs and statistics, the run's method first.
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path
from typing import Any

from vitfold.errors import VitfoldError
from vitfold.pipeline.atomic import atomic_write_json
from vitfold.pipeline.config import RunConfig, load_config, training_params
from vitfold.pipeline.stages.rundir import RunDir
from vitfold.pipeline.stages.stage import Context, Stage, StageResult, execute
from vitfold.pipeline.stages.train import TRAIN

ENTRY_KEYS = ("method_options", "train")


def method_config(cfg: RunConfig, method: str, entry: dict[str, Any], seed: int) -> RunConfig:
    """The run's training config with `method`, the entry's options and training overrides, and `seed`."""
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
        seed=seed,
        method_options=entry.get("method_options") or {},
        train={**cfg.to_dict()["train"], **(entry.get("train") or {})},
    )


def run_result(rd: RunDir) -> dict[str, Any]:
    """One finished training run: the epoch its adapter file holds (the one the fold takes), that epoch's
    evaluation (and validation) accuracy, and the best evaluation accuracy over epochs."""
    meta = rd.metadata(rd.adapter)
    with open(rd.metrics) as f:
        accuracies = [float(r["eval_acc"]) for r in csv.DictReader(f) if r["eval_acc"] != ""]
    select_acc = meta.get("select_acc", "")
    return {
        "run": str(rd.path),
        "epoch": int(meta["epoch"]),
        "acc": float(meta["eval_acc"]),
        "select_acc": float(select_acc) if select_acc != "" else None,
        "best_eval_acc": max(accuracies),
    }


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def method_summary(cfg: RunConfig, runs: list[tuple[int, RunDir]]) -> dict[str, Any]:
    """A method's settings, trainable parameter counts and splits, its run per seed, and the mean ± std over
    seeds of the folded epoch's accuracy and of the best accuracy over epochs."""
    from vitfold.pipeline.adapting import parameter_counts
    from vitfold.pipeline.models import build_model

    first = runs[0][1]
    counts = parameter_counts(build_model(cfg, first.num_classes))
    per_seed = [{"seed": seed, **run_result(rd)} for seed, rd in runs]
    acc, best = (_mean_std([r[key] for r in per_seed]) for key in ("acc", "best_eval_acc"))
    return {
        "method": cfg.method,
        "method_options": cfg.method_options,
        "epochs": cfg.train.total_epochs,
        "lr": cfg.train.lr,
        "select": cfg.train.select,
        "splits": json.loads(first.metadata(first.adapter)["splits"]),
        "adapter_params": counts["adapter_params"],
        "head_params": counts["head_params"],
        "trainable_params": counts["adapter_params"] + counts["head_params"],
        "backbone_params": counts["backbone_params"],
        "seeds": [seed for seed, _ in runs],
        "acc_mean": acc[0],
        "acc_std": acc[1],
        "best_eval_acc_mean": best[0],
        "best_eval_acc_std": best[1],
        "runs": per_seed,
    }


def _train(rd: RunDir, sub_cfg: RunConfig, ctx: Context) -> RunDir:
    """Train `sub_cfg` into its own run directory under compare/ (resuming an unfinished one)."""
    sub = RunDir(rd.compare_dir / sub_cfg.method / f"seed-{sub_cfg.seed}")
    same = sub.config_file.is_file() and sub.config_file.read_text() == sub_cfg.to_yaml()
    sub.write_config(sub_cfg)
    label = f"compare {sub_cfg.method} seed {sub_cfg.seed}"
    ctx.log(f"{label}: training into {sub.path}")
    execute(TRAIN, sub, settings=sub_cfg, log=lambda line: ctx.log(f"{label}: {line}"), resume=same)
    return sub


def _run(rd: RunDir, cfg: RunConfig, ctx: Context) -> StageResult:
    """Train every method over every seed (the run itself stands for its own method and seed; unfinished
    runs resume); write compare/compare.json, the run's method first."""
    seeds = cfg.seeds or [cfg.seed]
    own = dict(cfg.compare.get(cfg.method) or {})  # the run's method may compare with other training settings
    own["method_options"] = {**cfg.method_options, **(own.get("method_options") or {})}
    own_is_the_run = not own.get("train") and own["method_options"] == cfg.method_options
    others = {method: entry for method, entry in cfg.compare.items() if method != cfg.method}
    methods = {cfg.method: own, **others}
    summaries = []
    for method, entry in methods.items():
        runs = []
        for seed in seeds:
            sub_cfg = method_config(cfg, method, entry, seed)
            same_as_run = method == cfg.method and seed == cfg.seed and own_is_the_run
            runs.append((seed, rd if same_as_run else _train(rd, sub_cfg, ctx)))
        summary = method_summary(method_config(cfg, method, entry, seeds[0]), runs)
        summaries.append({**summary, "includes_this_run": any(run is rd for _, run in runs)})
    atomic_write_json(rd.compare_summary, {"seeds": seeds, "methods": summaries})
    for r in summaries:
        ctx.log(
            f"compare: {r['method']:7s} {r['trainable_params']:>10,} trainable  "
            f"acc {r['acc_mean']:.3f} ± {r['acc_std']:.3f} over {len(seeds)} seed(s)"
        )
    return StageResult([rd.compare_summary], value=summaries)


def _params(cfg: RunConfig) -> dict[str, Any]:
    """The training settings less the method (each compared method has its own), and the methods."""
    shared = {k: v for k, v in training_params(cfg).items() if k not in ("method", "method_options")}
    return {**shared, "compare": cfg.compare, "seeds": cfg.seeds}


def _inputs(rd: RunDir, cfg: RunConfig) -> list[Path]:
    return [rd.metrics, rd.adapter, *([Path(cfg.checkpoint)] if cfg.checkpoint else [])]


COMPARE = Stage("compare", section=None, inputs=_inputs, run=_run, params=_params)
