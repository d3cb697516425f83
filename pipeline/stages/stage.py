"""A stage is one declaration: its config section, the files it reads, and its run function. Its own
command (`vitfold fold RUN`, ...) and `vitfold run` both execute it through `execute`, which marks it
running, runs it, and records the settings it ran with, its inputs and its outputs in the manifest."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

from vitfold.pipeline.config import RunConfig
from vitfold.pipeline.stages.manifest import record_stage, start_stage
from vitfold.pipeline.stages.rundir import RunDir

Log = Callable[[str], None]


@dataclass(frozen=True)
class Context:
    """How this execution was asked for: where to log, and whether to continue an unfinished run."""

    log: Log = print
    resume: bool = False


@dataclass
class StageResult:
    """What a run function returns: the files it wrote, extra manifest fields, and a value for the caller.
    `record=False` (a DDP process other than rank 0) leaves the manifest alone."""

    outputs: list[Path]
    value: Any = None
    extra: dict[str, Any] = field(default_factory=dict)
    record: bool = True


def _as_params(settings: Any) -> dict[str, Any]:
    return asdict(settings) if is_dataclass(settings) else dict(settings)


@dataclass(frozen=True)
class Stage:
    name: str
    settings: Callable[[RunConfig], Any]  # the part of the run config the stage reads
    inputs: Callable[[RunDir, Any], list[Path]]  # the files it reads (absent optional ones are skipped)
    run: Callable[[RunDir, Any, Context], StageResult]
    params: Callable[[Any], dict[str, Any]] = _as_params  # the settings as recorded and compared


def execute(stage: Stage, rd: RunDir, settings: Any = None, log: Log = print, resume: bool = False) -> Any:
    """Run `stage` on `rd` with `settings` (default: its section of the run's config); record it when done."""
    settings = stage.settings(rd.config) if settings is None else settings
    main = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 writes the manifest
    if main:
        start_stage(rd, stage.name)
    started = time.perf_counter()
    result = stage.run(rd, settings, Context(log, resume))
    if main and result.record:
        seconds = time.perf_counter() - started
        record_stage(
            rd, stage.name, stage.params(settings), stage.inputs(rd, settings), result.outputs, seconds, **result.extra
        )
    return result.value
