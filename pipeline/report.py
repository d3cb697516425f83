"""RUN/REPORT.md: what ran, where, with which settings, and the three tables (accuracy per method,
equivalence per backend, latency per backend) with the latency chart and the verdicts. Built only from
the files the stages wrote, so it can be regenerated at any time (`vitfold report RUN`)."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

from pipeline.config import load_config
from pipeline.errors import VitfoldError
from pipeline.manifest import cpu_name, read_manifest, record_stage
from pipeline.run import atomic_write_text

REPORT = "REPORT.md"
SOURCES = ("compare/compare.json", "verify/verify.json", "bench/bench.json")


def _machine() -> str:
    import torch

    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    system = f"{platform.system()} {platform.release()}"
    return f"{system}, {cpu_name()} ({_cores()} cores){gpu}; Python {platform.python_version()}"


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _table(header: list[str], rows: list[list[Any]], align: str) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"] + [
        "| " + " | ".join(map(str, r)) + " |" for r in rows
    ]


def _accuracy(results: list[dict[str, Any]]) -> list[str]:
    rows = [[r["method"] + (" (this run)" if i == 0 else ""), f"{r['trainable_params']:,}",
             f"{r['trainable_params'] / r['backbone_params']:.2%}", f"{r['best_acc']:.3f}", f"{r['final_acc']:.3f}",
             r["epochs"], r["lr"], r["seed"]] for i, r in enumerate(results)]  # fmt: skip
    header = ["method", "trainable params (adapter + head)", "of backbone", "best eval acc", "final eval acc",
              "epochs", "lr", "seed"]  # fmt: skip
    return _table(header, rows, ["---", "--:", "--:", "--:", "--:", "--:", "--:", "--:"])


def _equivalence(verify: dict[str, Any]) -> list[str]:
    rows = [[r["kind"], r["backend"], r["device"], r["batch_size"], r["compared_to"], f"{r['max_abs']:.2e}",
             f"{r['max_rel']:.2e}", f"{r['cosine_min']:.7f}", f"{r['top1_agreement']:.3f}",
             "pass" if r["passed"] else "**FAIL**"] for r in verify["results"]]  # fmt: skip
    header = ["kind", "backend", "device", "batch", "vs", "max abs", "max rel", "min cosine", "top-1 agree", "verdict"]
    lines = _table(header, rows, ["---", "---", "---", "--:", "---", "--:", "--:", "--:", "--:", "---"])
    lines += [f"- {name}: first divergence at `{where['where']}`" for name, where in verify["localisation"].items()]
    lines += [f"- {name} not verified: {reason}" for name, reason in verify["skipped"].items()]
    return lines


def _latency(bench: dict[str, Any]) -> list[str]:
    rows = [[r["backend"], r["device"], r["batch_size"], *(f"{r[k]:.3f}" for k in ("p50_ms", "p90_ms", "p99_ms")),
             f"{r['throughput_ips']:.1f}"] for r in bench["rows"]]  # fmt: skip
    lines = _table(["backend", "device", "batch", "p50 ms", "p90 ms", "p99 ms", "img/s"], rows,
                   ["---", "---", "--:", "--:", "--:", "--:", "--:"])  # fmt: skip
    for name, per_batch in bench.get("ratios", {}).items():
        values = ", ".join(f"batch {b}: {v:.3f}" for b, v in per_batch.items())
        lines.append(f"- {name.replace('_', ' ')} (p50 ratio): {values}")
    lines += [f"- {name} not measured: {reason}" for name, reason in bench.get("skipped", {}).items()]
    return lines + ["", "![latency per backend](bench/latency.png)"]


def _load(run_dir: Path, name: str) -> Any:
    path = run_dir / name
    return json.loads(path.read_text()) if path.is_file() else None


def report_stage(run_dir: Path, log=print) -> Path:
    """Write RUN/REPORT.md from the stages' outputs (sections for missing stages say so)."""
    started = time.perf_counter()
    if not (run_dir / "config.yaml").is_file():
        raise VitfoldError(f"{run_dir} is not a run directory: {run_dir / 'config.yaml'} not found")
    cfg = load_config(run_dir / "config.yaml")
    manifest = read_manifest(run_dir)
    compare, verify, bench = (_load(run_dir, n) for n in SOURCES)
    verdict = "no verify result" if verify is None else ("PASSED" if verify["passed"] else "FAILED")
    lines = [
        f"# vitfold run report: {cfg.backbone} + {cfg.method} on {cfg.data}",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {_machine()}.",
        f"Verification: **{verdict}**.",
        "",
        "## Configuration",
        "",
        f"- backbone `{cfg.backbone}` {cfg.backbone_kwargs or ''}; weights: "
        + (f"`{cfg.checkpoint}`" if cfg.checkpoint else "hub" if cfg.pretrained else "random init"),
        f"- pre-training: {cfg.pretrain['data']} ({(cfg.pretrain.get('train') or {}).get('epochs', '?')} epochs, full)"
        if cfg.pretrain
        else "- pre-training: none",
        f"- data `{cfg.data}`; method `{cfg.method}` {cfg.method_options or ''}; seed {cfg.seed}",
        f"- training: {cfg.train.epochs} epochs, batch {cfg.train.batch_size}, lr {cfg.train.lr}, "
        f"weight decay {cfg.train.weight_decay}, warm-up {cfg.train.warmup_epochs} epochs, "
        f"drop-path {cfg.train.drop_path}",
        f"- export: {', '.join(cfg.export.formats)} ({cfg.export.precision}, opset {cfg.export.opset})",
        "",
        "## Stages",
        "",
        *_table(
            ["stage", "status", "seconds", "finished"],
            [
                [name, e.get("status", "?"), e.get("seconds", ""), e.get("finished", "")]
                for name, e in manifest["stages"].items()
                if name != "report"
            ],
            ["---", "---", "--:", "---"],
        ),  # fmt: skip
        "",
        "## Accuracy on the target task",
        "",
        *(_accuracy(compare) if compare else ["No comparison ran (`compare:` in the config)."]),
        "",
        "## Equivalence: every artifact against the unmerged adapted model",
        "",
        *(_equivalence(verify) if verify else ["verify has not run."]),
        "",
        "## Latency",
        "",
        *(_latency(bench) if bench else ["bench has not run."]),
        "",
        "## Artifacts",
        "",
        *[
            f"- `{path}` sha256 `{digest[:16]}…`"
            for name, e in manifest["stages"].items()
            if name in ("fold", "export")
            for path, digest in e["outputs"].items()
        ],  # fmt: skip
        "",
    ]
    out = atomic_write_text(run_dir / REPORT, "\n".join(lines))
    inputs = [run_dir / "config.yaml"] + [run_dir / n for n in SOURCES if (run_dir / n).is_file()]
    record_stage(run_dir, "report", inputs, [out], time.perf_counter() - started)
    log(f"report: {out}")
    return out
