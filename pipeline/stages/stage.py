"""A stage is one declaration: its config section, the files it reads, and its run function. Its own
command (`vitfold fold RUN`, ...) and `vitfold run` both execute it through `execute`, which marks it
running, runs it, and records the settings it ran with, its inputs and its outputs in the manifest.

Nothing is recorded before the settings are found valid: a stage that fails with a `VitfoldError` leaves
the manifest as it was, and the run's config is saved only once the stage has resolved it (`Context.settled`,
which the train stage calls when its backbone, data and options are built) or has finished."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

from vitfold.errors import VitfoldError
from vitfold.pipeline.config import RunConfig, check_config
from vitfold.pipeline.stages.manifest import read_manifest_bytes, record_stage, restore_manifest, start_stage
from vitfold.pipeline.stages.rundir import RunDir

Log = Callable[[str], None]


@dataclass(frozen=True)
class Context:
    """How this execution was asked for: where to log, whether to continue an unfinished run, and where
    to write the stage's files when not into the run (`out_dir`, for a read-only run; verify honours it)."""

    log: Log = print
    resume: bool = False
    out_dir: Path | None = None
    trust: bool = False  # load artifacts that run code though this machine's vitfold did not write them
    settled: Callable[[], None] = lambda: None  # the config is resolved: save it (config.yaml) now


@dataclass
class StageResult:
    """What a run function returns: the files it wrote, extra manifest fields, and a value for the caller."""

    outputs: list[Path]
    value: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


def _as_params(settings: Any) -> dict[str, Any]:
    return asdict(settings) if is_dataclass(settings) else dict(settings)


@dataclass(frozen=True)
class Stage:
    name: str
    section: str | None  # the RunConfig field that holds the stage's settings (None: the whole config)
    inputs: Callable[[RunDir, Any], list[Path]]  # the files it reads (absent optional ones are skipped)
    run: Callable[[RunDir, Any, Context], StageResult]
    params: Callable[[Any], dict[str, Any]] = _as_params  # the settings as recorded and compared
    # refuses settings this machine cannot run (a missing runtime, a format's dependency) before the stage is
    # marked running, so that a refused call leaves the run's record as it was
    check: Callable[[RunDir, Any], None] | None = None

    def settings(self, cfg: RunConfig, **overrides: Any) -> Any:
        """The stage's settings in `cfg`, with `overrides` (checked like the config file's values)."""
        if not overrides:
            return getattr(cfg, self.section) if self.section else cfg
        if self.section is None:
            raise VitfoldError(f"stage {self.name} takes no setting overrides ({', '.join(overrides)})")
        section = getattr(cfg, self.section)
        unknown = sorted(set(overrides) - {f.name for f in fields(section)})
        if unknown:
            raise VitfoldError(f"{self.name}: unknown setting '{unknown[0]}'")
        changed = replace(section, **overrides)
        check_config(replace(cfg, **{self.section: changed}), where=f"vitfold {self.name}")
        return changed


def execute(
    stage: Stage,
    rd: RunDir,
    settings: Any = None,
    log: Log = print,
    resume: bool = False,
    record: bool = True,
    out_dir: Path | None = None,
    trust: bool = False,
    settled: Callable[[], None] = lambda: None,
) -> Any:
    """Run `stage` on `rd` with `settings` (default: its section of the run's config); record it in the
    manifest when done (unless `record=False`: a DDP process other than rank 0, a read-only run).
    `settled` saves the run's config: called by the stage once it has resolved it, else when it is done.
    A `VitfoldError` (an input error) puts the manifest back as it was before the stage started."""
    settings = stage.settings(rd.config) if settings is None else settings
    if stage.check is not None:
        stage.check(rd, settings)
    before = read_manifest_bytes(rd) if record else None
    if record:
        start_stage(rd, stage.name)
    started = time.perf_counter()
    try:
        result = stage.run(rd, settings, Context(log, resume, out_dir, trust, settled))
    except VitfoldError:
        if record:
            restore_manifest(rd, before)
        raise
    settled()
    if record:
        seconds = time.perf_counter() - started
        record_stage(
            rd, stage.name, stage.params(settings), stage.inputs(rd, settings), result.outputs, seconds, **result.extra
        )
    return result.value
