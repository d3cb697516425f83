"""`vitfold run`: the staged pipeline, re-running only what is out of date.

    pretrain? -> train -> compare? -> fold -> export -> verify -> bench -> report

Each stage declares the config settings it depends on and the files it reads. It is skipped when
RUN/manifest.json says it finished with the same settings, every input still has the sha256 it had
then, and every output still has the sha256 it was written with. Otherwise the log says why it runs
(`--force STAGE` reruns from that stage). Everything a stage writes is atomic and the manifest entry is
written last, so a run killed at any point is finished by running it again (training resumes from its
last epoch checkpoint).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig, training_params
from pipeline.errors import VitfoldError
from pipeline.manifest import read_manifest, record_stage, stale_reason, start_stage

RESUMABLE = ("not run yet", "it did not finish")


@dataclass(frozen=True)
class Stage:
    name: str
    params: Callable[[RunConfig], dict[str, Any]]
    inputs: Callable[[Path, RunConfig], list[Path]]
    run: Callable[[Path, RunConfig, str, Callable], Any]  # (run_dir, cfg, why it runs, log)


def _checkpoint(cfg: RunConfig) -> list[Path]:
    return [Path(cfg.checkpoint)] if cfg.checkpoint else []


def _exported(run_dir: Path, cfg: RunConfig) -> list[Path]:
    """The folded model and the artifacts the export stage recorded."""
    outputs = read_manifest(run_dir)["stages"].get("export", {}).get("outputs", {})
    return [run_dir / "fold" / "model.safetensors", *(run_dir / key for key in sorted(outputs))]


def _run_pretrain(run_dir: Path, cfg: RunConfig, why: str, log) -> None:
    from pipeline.pretrain import pretrain

    started = time.perf_counter()
    path = pretrain(cfg, log=log)
    record_stage(run_dir, "pretrain", [], [path], time.perf_counter() - started)


def _run_train(run_dir: Path, cfg: RunConfig, why: str, log) -> None:
    from pipeline.train import train

    train(cfg, run_dir, resume=why in RESUMABLE, log=log)  # a killed run resumes from train/last.ckpt
    if read_manifest(run_dir)["stages"].get("train", {}).get("status") != "done":
        raise VitfoldError(f"train did not record its outputs in {run_dir / 'manifest.json'}")


def _run_compare(run_dir: Path, cfg: RunConfig, why: str, log) -> None:
    from pipeline.compare import compare_stage

    started = time.perf_counter()
    compare_stage(cfg, run_dir, log=log)
    inputs = [run_dir / "train" / "metrics.csv", *_checkpoint(cfg)]
    record_stage(run_dir, "compare", inputs, [run_dir / "compare" / "compare.json"], time.perf_counter() - started)


def _run_fold(run_dir: Path, cfg: RunConfig, why: str, log) -> None:
    from pipeline.fold_stage import fold_stage

    fold_stage(run_dir, log=log)


def _run_export(run_dir: Path, cfg: RunConfig, why: str, log) -> None:
    from export.stage import export_stage

    e = cfg.export
    export_stage(run_dir, list(e.formats), e.precision, e.opset, device=e.device, log=log)


def _run_verify(run_dir: Path, cfg: RunConfig, why: str, log) -> None:
    from export.verify import verify_stage

    v = cfg.verify
    verify_stage(run_dir, v.backends, tuple(v.batch_sizes), v.samples, v.device, v.tolerances, log=log)


def _run_bench(run_dir: Path, cfg: RunConfig, why: str, log) -> None:
    from export.bench import bench_stage

    b = cfg.bench
    bench_stage(run_dir, b.backends, tuple(b.batch_sizes), b.device, b.threads, b.min_iters, b.min_seconds, log=log)


def _run_report(run_dir: Path, cfg: RunConfig, why: str, log) -> None:
    from pipeline.report import report_stage

    report_stage(run_dir, log=log)


def _report_inputs(run_dir: Path, cfg: RunConfig) -> list[Path]:
    from pipeline.report import SOURCES

    return [run_dir / "config.yaml", *(run_dir / n for n in SOURCES if (run_dir / n).is_file())]


def _compare_params(cfg: RunConfig) -> dict[str, Any]:
    shared = {k: v for k, v in training_params(cfg).items() if k not in ("method", "method_options")}
    return {**shared, "compare": cfg.compare}


def stages(cfg: RunConfig) -> list[Stage]:
    """The pipeline for `cfg`, in order (pretrain and compare only when the config asks for them)."""
    nothing: Callable[[RunConfig], dict[str, Any]] = lambda c: {}  # noqa: E731
    chosen = [
        Stage("pretrain", lambda c: {"pretrain": c.pretrain, "checkpoint": c.checkpoint}, lambda r, c: [],
              _run_pretrain) if cfg.pretrain else None,
        Stage("train", training_params, lambda r, c: _checkpoint(c), _run_train),
        Stage("compare", _compare_params, lambda r, c: [r / "train" / "metrics.csv", *_checkpoint(c)], _run_compare)
        if cfg.compare else None,
        Stage("fold", nothing, lambda r, c: [r / "train" / "adapter.safetensors", *_checkpoint(c)], _run_fold),
        Stage("export", lambda c: asdict(c.export), lambda r, c: [r / "fold" / "model.safetensors"], _run_export),
        Stage("verify", lambda c: asdict(c.verify), lambda r, c: [r / "train" / "adapter.safetensors",
                                                                   *_exported(r, c)], _run_verify),
        Stage("bench", lambda c: asdict(c.bench), _exported, _run_bench),
        Stage("report", nothing, _report_inputs, _run_report),
    ]  # fmt: skip
    return [s for s in chosen if s is not None]


def run_pipeline(cfg: RunConfig, run_dir: Path, force: str | None = None, log=print) -> dict[str, str]:
    """Run every out-of-date stage of `cfg` in `run_dir`; returns {stage: "ran: why" | "up to date"}."""
    pipeline = stages(cfg)
    names = [s.name for s in pipeline]
    if force is not None and force not in names:
        raise VitfoldError(f"--force {force}: not a stage of this run (stages: {', '.join(names)})")
    outcome: dict[str, str] = {}
    forcing = False
    for stage in pipeline:
        forcing = forcing or stage.name == force
        params = stage.params(cfg)
        why = "forced (--force)" if forcing else stale_reason(run_dir, stage.name, stage.inputs(run_dir, cfg), params)
        if why is None:
            log(f"== {stage.name}: up to date, skipped")
            outcome[stage.name] = "up to date"
            continue
        log(f"== {stage.name}: running ({why})")
        start_stage(run_dir, stage.name, params)
        stage.run(run_dir, cfg, why, log)
        outcome[stage.name] = f"ran: {why}"
    return outcome
