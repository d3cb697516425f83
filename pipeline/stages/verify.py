"""The verify stage: does every artifact compute what the adapted (unmerged) model computes?

Inputs: a fixed, seeded sample of the run's evaluation images plus as many seeded random images at the
model's normalisation, run at each requested batch size (1 and the largest, by default).

Two separate questions, two kinds of rows:
- fold:   torch-folded vs torch-unmerged (did folding change the function?)
- export: each artifact vs torch-folded (did exporting change it?), with its end-to-end statistics vs
          torch-unmerged beside them.
So a wrong fold fails the fold row while every faithful export of it still passes, and a broken export
fails only its own row. Measuring, judging, localising and rendering are the gate library's
(`vitfold.export.gate`); this stage knows the run: its backends, its inputs, where it writes.

Writes verify/verify.json, verify/verify.md and verify/junit.xml; `passed` is false on any mismatch.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from vitfold.errors import VitfoldError
from vitfold.export.gate import (
    Inputs,
    gate_result,
    judge,
    loosened_tolerances,
    random_images,
    render_junit,
    render_markdown,
    split_loader,
    summary_lines,
)
from vitfold.export.runners import open_runner
from vitfold.names import ARTIFACT_BACKENDS
from vitfold.pipeline.atomic import atomic_write_json, atomic_write_text
from vitfold.pipeline.config import VerifyConfig
from vitfold.pipeline.data import build_splits, parse_data_spec
from vitfold.pipeline.models import data_transform
from vitfold.pipeline.stages.backends import (
    FOLDED,
    UNMERGED,
    backend_files,
    backend_precision,
    backend_unavailable,
    checked_artifact,
    default_backends,
    open_backend,
    unmerged_model,
)
from vitfold.pipeline.stages.manifest import recorded_outputs
from vitfold.pipeline.stages.rundir import RunDir
from vitfold.pipeline.stages.stage import Context, Stage, StageResult

EXPORT_BACKENDS = tuple(ARTIFACT_BACKENDS)


def evaluation_split(rd: RunDir, model: torch.nn.Module) -> Dataset:
    """The run's evaluation split at `model`'s input size and the run's normalisation."""
    return build_splits(parse_data_spec(rd.config.data), data_transform(rd.config, model)).eval


def verify_inputs(rd: RunDir, model: torch.nn.Module, samples: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """`samples` real evaluation images (seeded choice) and `samples` seeded random images, (n, 3, H, W),
    at `model`'s input size and the run's normalisation."""
    g = torch.Generator().manual_seed(seed)
    evaluation = evaluation_split(rd, model)
    picks = torch.randperm(len(evaluation), generator=g)[:samples].tolist()
    real = torch.stack([evaluation[i][0] for i in picks])
    transform = data_transform(rd.config, model)
    return {"real": real, "random": random_images(transform.mean, transform.std, transform.size, samples, g)}


def _backends(rd: RunDir, requested: list[str] | None, device: str, log) -> tuple[list[str], dict[str, str]]:
    skipped: dict[str, str] = {}
    chosen = []
    for name in requested or default_backends(rd, EXPORT_BACKENDS):
        reason = backend_unavailable(rd, name, device)
        if reason and requested:
            raise VitfoldError(f"backend {name}: {reason}")
        if reason:
            skipped[name] = reason
            log(f"skip {name}: {reason}")
        else:
            chosen.append(name)
    return chosen, skipped


def check_writable(folder: Path) -> None:
    """Fail now, with one line, when verify could not write its results into `folder`."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise VitfoldError(
            f"cannot write verify's results into {folder} ({e.strerror or e}): use --output DIR"
        ) from None


def _run(rd: RunDir, v: VerifyConfig, ctx: Context) -> StageResult:
    """Compare fold and every available (or requested) export; write verify/*; the value is verify.json's."""
    tolerances, loosened = loosened_tolerances(v.tolerances, ctx.log)
    chosen, skipped = _backends(rd, v.backends, v.device, ctx.log)
    if not chosen and not v.allow_no_export:
        why = "; ".join(f"{name}: {reason}" for name, reason in skipped.items())
        raise VitfoldError(f"verify: no exported artifact to check ({why}); --allow-no-export checks the fold alone")
    for name in chosen:  # a changed, unrecorded or untrusted artifact stops verify before any work
        hint = f"to check a changed file against this run: vitfold verify --artifact FILE --reference {rd.path}"
        checked_artifact(rd, name, ctx.trust, hint=hint)
    out_dir = ctx.out_dir or rd.verify_dir
    check_writable(out_dir)  # before minutes of work, not after
    rows, localisation = [], {}
    unmerged = unmerged_model(rd)
    inputs = run_inputs(rd, unmerged, v)
    with open_runner("torch", unmerged, v.device) as reference, open_backend(rd, FOLDED, v.device) as folded:
        expected, folded_out = inputs.measure(UNMERGED, reference, ctx.log), inputs.measure(FOLDED, folded, ctx.log)
        rows, where = judge("fold", "fp32", tolerances["fp32"], folded_out, expected, None, inputs)
        localisation = {FOLDED: where} if where else {}
        for name in chosen:
            precision = backend_precision(rd, name)
            with open_backend(rd, name, v.device, trust=ctx.trust) as runner:
                measured = inputs.measure(name, runner, ctx.log)
                new, where = judge("export", precision, tolerances[precision], measured, folded_out, expected, inputs)
            rows += new
            localisation |= {name: where} if where else {}
    result = gate_result(rows, localisation, v.device, inputs, tolerances, loosened, skipped)
    return StageResult(write_results(result, out_dir, ctx.log), value=result, extra={"passed": result["passed"]})


def run_inputs(rd: RunDir, model: torch.nn.Module, v: VerifyConfig) -> Inputs:
    """The run's sample (`verify_inputs`) and its evaluation split (`v.eval_images` of it), at `model`'s size."""
    images = verify_inputs(rd, model, v.samples)
    split = split_loader(evaluation_split(rd, model), v.eval_images, max(v.batch_sizes))
    return Inputs(images, tuple(v.batch_sizes), split)


def write_results(result: dict[str, Any], out_dir: Path, log) -> list[Path]:
    """verify.json, verify.md and junit.xml of `result` in `out_dir` (each atomic); log the rows and verdict."""
    outputs = [out_dir / "verify.json", out_dir / "verify.md", out_dir / "junit.xml"]
    atomic_write_json(outputs[0], result)
    atomic_write_text(outputs[1], render_markdown(result))
    atomic_write_text(outputs[2], render_junit(result))
    for line in summary_lines(result):
        log(line)
    return outputs


def _inputs(rd: RunDir, v: VerifyConfig) -> list[Path]:
    """The adapter, the folded model and every artifact the export stage recorded, verified or skipped."""
    return list(dict.fromkeys([*backend_files(rd, UNMERGED), rd.folded, *recorded_outputs(rd, "export")]))


VERIFY = Stage("verify", section="verify", inputs=_inputs, run=_run)
