"""`vitfold run`: the staged pipeline, re-running only what is out of date.

    pretrain? -> train -> compare? -> fold -> export -> verify -> bench -> report

A stage is skipped when the manifest says it finished with the same settings, every input still has
the sha256 it had then, and every output still has the sha256 it was written with. Otherwise the log
says why it runs (`--force STAGE` reruns from that stage). Everything a stage writes is atomic and the
manifest entry is written last, so a run killed at any point is finished by running it again (training
resumes from its last epoch checkpoint).
"""

from __future__ import annotations

from vitfold.errors import VitfoldError
from vitfold.pipeline.config import RunConfig
from vitfold.pipeline.stages.bench import BENCH
from vitfold.pipeline.stages.compare_methods import COMPARE
from vitfold.pipeline.stages.export import EXPORT
from vitfold.pipeline.stages.fold import FOLD
from vitfold.pipeline.stages.manifest import Stale, Staleness, record_pipeline, staleness
from vitfold.pipeline.stages.pretrain import PRETRAIN
from vitfold.pipeline.stages.report import REPORT
from vitfold.pipeline.stages.rundir import RunDir
from vitfold.pipeline.stages.stage import Log, Stage, execute
from vitfold.pipeline.stages.train import TRAIN
from vitfold.pipeline.stages.verify import VERIFY

STAGES = {s.name: s for s in (PRETRAIN, TRAIN, COMPARE, FOLD, EXPORT, VERIFY, BENCH, REPORT)}


def stages_for(cfg: RunConfig) -> list[Stage]:
    """The pipeline for `cfg`, in order (pretrain and compare only when the config asks for them)."""
    optional = {"pretrain": bool(cfg.pretrain), "compare": bool(cfg.compare)}
    return [stage for name, stage in STAGES.items() if optional.get(name, True)]


def run_pipeline(
    rd: RunDir, config: RunConfig, force: str | None = None, log: Log = print, trust: bool = False
) -> dict[str, str]:
    """Run every out-of-date stage of `config`, holding the run's lock, and save it as the run's config
    once a stage has resolved it (a failing first stage leaves config.yaml as it was);
    returns {stage: "ran: why" | "up to date"}. `trust`: as for `run_stage`."""
    pipeline = stages_for(config)
    names = [s.name for s in pipeline]
    if force is not None and force not in names:
        raise VitfoldError(f"--force {force}: not a stage of this run (stages: {', '.join(names)})")
    with rd.locked():
        rd.use_config(config)  # saved by the first stage that runs, once it has resolved it
        outcome = _run_stages(rd, pipeline, force, log, trust)
        rd.save_config()
        watched = {stage.name: stage.inputs(rd, stage.settings(rd.config)) for stage in pipeline}
        record_pipeline(rd, rd.config.to_yaml(), watched)  # a rerun with nothing to do: pipeline_unchanged
        return outcome


def _run_stages(rd: RunDir, pipeline: list[Stage], force: str | None, log: Log, trust: bool) -> dict[str, str]:
    outcome: dict[str, str] = {}
    forcing = False
    for stage in pipeline:
        forcing = forcing or stage.name == force
        settings = stage.settings(rd.config)
        why = (
            Staleness(Stale.FORCED, "forced (--force)")
            if forcing
            else staleness(rd, stage.name, stage.inputs(rd, settings), stage.params(settings))
        )
        if why is None:
            log(f"== {stage.name}: up to date, skipped")
            outcome[stage.name] = "up to date"
            continue
        log(f"== {stage.name}: running ({why})")
        # a killed training resumes from last.ckpt
        execute(stage, rd, settings, log=log, resume=why.resumable, trust=trust, settled=rd.save_config)
        outcome[stage.name] = f"ran: {why}"
    return outcome
