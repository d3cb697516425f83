"""The stage layer: the only code that knows a run directory (RUN/config.yaml, RUN/manifest.json and
every file the stages write). Each stage is one `Stage` declaration; `run_stage` runs one alone (its
CLI command), `run_pipeline` every out-of-date one in order (`vitfold run`)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from vitfold.errors import VitfoldError
from vitfold.pipeline.stages.rundir import RunDir
from vitfold.pipeline.stages.stage import Log, execute


def run_stage(
    name: str,
    run_dir: str | Path | RunDir,
    *,
    log: Log = print,
    resume: bool = False,
    settings: Any = None,
    **overrides: Any,
) -> Any:
    """Run stage `name` on the run directory, with its config section changed by `overrides` (or with
    `settings` whole); the manifest records the settings it ran with. Returns the stage's value."""
    from vitfold.pipeline.stages.pipeline import STAGES

    rd = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    stage = STAGES[name]
    if settings is None:
        settings = stage.settings(rd.config)
        if overrides:
            try:
                settings = replace(settings, **overrides)
            except TypeError as e:
                raise VitfoldError(f"{name}: {e}") from None
    return execute(stage, rd, settings, log=log, resume=resume)


__all__ = ["RunDir", "run_stage"]
