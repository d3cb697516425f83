"""The stage layer: the only code that knows a run directory (RUN/config.yaml, RUN/manifest.json and
every file the stages write). Each stage is one `Stage` declaration; `run_stage` runs one alone (its
CLI command), `run_pipeline` every out-of-date one in order (`vitfold run`)."""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from vitfold.pipeline.config import RunConfig
from vitfold.pipeline.stages.rundir import RunDir
from vitfold.pipeline.stages.stage import Log, execute


def run_stage(
    name: str,
    run_dir: str | Path | RunDir,
    *,
    log: Log = print,
    resume: bool = False,
    settings: Any = None,
    config: RunConfig | None = None,
    out_dir: str | Path | None = None,
    trust: bool = False,
    **overrides: Any,
) -> Any:
    """Run stage `name` on the run directory, with its config section changed by `overrides` (or with
    `settings` whole), holding the run's lock; the manifest records the settings it ran with. `config` is
    saved as the run's config once the stage has resolved it. With `out_dir` the stage writes its files there
    and nothing into the run (no lock, no manifest: a read-only run). `trust` loads artifacts that run code
    though this machine's vitfold did not write them. Returns the stage's value."""
    from vitfold.pipeline.stages.pipeline import STAGES

    rd = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    stage = STAGES[name]
    writer = out_dir is None and int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 writes
    with rd.locked() if writer else nullcontext():
        if config is not None:
            rd.use_config(config)  # saved once the stage has resolved it (nothing written before)
        if settings is None:
            settings = stage.settings(rd.config, **overrides)
        out = Path(out_dir) if out_dir is not None else None
        settled = rd.save_config if config is not None and writer else lambda: None
        return execute(
            stage, rd, settings, log=log, resume=resume, record=writer, out_dir=out, trust=trust, settled=settled
        )


__all__ = ["RunDir", "run_stage"]
