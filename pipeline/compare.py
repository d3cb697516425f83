"""The comparison stage: the same data, backbone and seed, trained with other methods, for the report's
accuracy table (the papers' table shape: method, trainable parameters, accuracy).

`compare: {linear: {}, full: {train: {lr: 5e-4}}, efft2: {method_options: {rank: 8}}}` in a run config:
each method trains into RUN/compare/<method>/ (its own run directory, resumable), and
RUN/compare/compare.json lists every method's result with the main run's method first.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig, load_config
from pipeline.errors import VitfoldError
from pipeline.run import atomic_write_json, atomic_write_text

ENTRY_KEYS = ("method_options", "train")


def method_config(cfg: RunConfig, method: str, entry: dict[str, Any]) -> RunConfig:
    """The run's training config with `method` and the entry's options and training overrides."""
    unknown = sorted(set(entry or {}) - set(ENTRY_KEYS))
    if unknown:
        raise VitfoldError(f"config: compare.{method}: unknown key '{unknown[0]}' (known: {', '.join(ENTRY_KEYS)})")
    entry = entry or {}
    return load_config(None, backbone=cfg.backbone, backbone_kwargs=cfg.backbone_kwargs, checkpoint=cfg.checkpoint,
                       pretrained=cfg.pretrained, data=cfg.data, method=method, num_classes=cfg.num_classes,
                       seed=cfg.seed, method_options=entry.get("method_options") or {},
                       train={**cfg.to_dict()["train"], **(entry.get("train") or {})})  # fmt: skip


def run_result(run_dir: Path, cfg: RunConfig) -> dict[str, Any]:
    """Method, trainable parameter counts and best evaluation accuracy of a finished training run."""
    from safetensors import safe_open

    from pipeline.adapting import parameter_counts
    from pipeline.train import build_model

    with open(run_dir / "train" / "metrics.csv") as f:
        accuracies = [float(r["eval_acc"]) for r in csv.DictReader(f) if r["eval_acc"] != ""]
    with safe_open(run_dir / "train" / "adapter.safetensors", "pt") as f:
        num_classes = int((f.metadata() or {})["num_classes"])
    counts = parameter_counts(build_model(cfg, num_classes))
    return {"method": cfg.method, "method_options": cfg.method_options, "seed": cfg.seed, "epochs": cfg.train.epochs,
            "lr": cfg.train.lr, "adapter_params": counts["adapter_params"], "head_params": counts["head_params"],
            "trainable_params": counts["adapter_params"] + counts["head_params"],
            "backbone_params": counts["backbone_params"], "best_acc": max(accuracies), "final_acc": accuracies[-1],
            "run": str(run_dir)}  # fmt: skip


def compare_stage(cfg: RunConfig, run_dir: Path, log=print) -> list[dict[str, Any]]:
    """Train every comparison method (resuming unfinished ones); write compare/compare.json."""
    from pipeline.train import train

    results = [run_result(run_dir, cfg)]
    for method, entry in cfg.compare.items():
        if method == cfg.method:
            continue
        sub_cfg = method_config(cfg, method, entry)
        sub_dir = run_dir / "compare" / method
        config_text = sub_cfg.to_yaml()
        same = (sub_dir / "config.yaml").is_file() and (sub_dir / "config.yaml").read_text() == config_text
        atomic_write_text(sub_dir / "config.yaml", config_text)
        log(f"compare: training {method}")
        train(sub_cfg, sub_dir, resume=same, log=log)
        results.append(run_result(sub_dir, sub_cfg))
    atomic_write_json(run_dir / "compare" / "compare.json", results)
    for r in results:
        log(f"compare: {r['method']:7s} {r['trainable_params']:>10,} trainable  best acc {r['best_acc']:.3f}")
    return results
