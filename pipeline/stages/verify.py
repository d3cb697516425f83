"""The verify stage: does every artifact compute what the adapted (unmerged) model computes?

Inputs: a fixed, seeded sample of the run's evaluation images plus as many seeded random images at the
model's normalisation, run at each requested batch size (1 and the largest, by default).

Two separate questions, two kinds of rows:
- fold:   torch-folded vs torch-unmerged (did folding change the function?)
- export: each artifact vs torch-folded (did exporting change it?), with its end-to-end statistics vs
          torch-unmerged beside them.
So a wrong fold fails the fold row while every faithful export of it still passes, and a broken export
fails only its own row. Statistics and tolerances: `vitfold.export.compare`. When a row fails, the first
transformer block whose output diverges is named (forward hooks in PyTorch, extra graph outputs in ONNX).

Writes verify/verify.json, verify/verify.md and verify/junit.xml; `passed` is false on any mismatch.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from vitfold.errors import VitfoldError
from vitfold.export.comparison import (
    DEFAULT_TOLERANCES,
    Tolerance,
    block_errors,
    compare,
    first_diverging_block,
    split_stats,
    tolerances_for,
)
from vitfold.export.runners import Runner, open_runner
from vitfold.pipeline.atomic import atomic_write_json, atomic_write_text
from vitfold.pipeline.config import VerifyConfig
from vitfold.pipeline.data import ImageTransform, build_splits, parse_data_spec
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

EXPORT_BACKENDS = (
    "torchscript",
    "onnxruntime",
    "onnxruntime-fp16",
    "onnxruntime-int8",
    "aoti",
    "aoti-fp16",
    "aoti-bf16",
    "tensorrt",
    "openvino",
    "openvino-bf16",
    "openvino-int8",
)
LOCALISE_IMAGES = 4
LOCALISE_WITHOUT_MAX_REL = 0.1  # block threshold for a precision judged on the split alone (int8)


def evaluation_split(rd: RunDir, model: torch.nn.Module) -> Dataset:
    """The run's evaluation split at `model`'s input size and the run's normalisation."""
    return build_splits(parse_data_spec(rd.config.data), data_transform(rd.config, model)).eval


def random_images(transform: ImageTransform, n: int, g: torch.Generator) -> torch.Tensor:
    """`n` seeded images (n, 3, H, W), uniform in [0, 1] per pixel, then normalised as `transform` does."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (transform.mean, transform.std))
    return (torch.rand(n, 3, *transform.size, generator=g) - mean) / std


def verify_inputs(rd: RunDir, model: torch.nn.Module, samples: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """`samples` real evaluation images (seeded choice) and `samples` seeded random images, (n, 3, H, W),
    at `model`'s input size and the run's normalisation."""
    g = torch.Generator().manual_seed(seed)
    evaluation = evaluation_split(rd, model)
    picks = torch.randperm(len(evaluation), generator=g)[:samples].tolist()
    real = torch.stack([evaluation[i][0] for i in picks])
    return {"real": real, "random": random_images(data_transform(rd.config, model), samples, g)}


def _logits(runner: Runner, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    outs = [runner(runner.to_device(chunk)).float().cpu() for chunk in images.split(batch_size)]
    return torch.cat(outs)  # (n, num_classes)


def _split_loader(split: Dataset, images: int | None, batch_size: int, seed: int = 0) -> DataLoader:
    """The evaluation split, or a seeded choice of `images` of it, in batches of `batch_size`."""
    if images is not None and images < len(split):
        split = Subset(split, torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:images])
    return DataLoader(split, batch_size=batch_size)


@dataclass(frozen=True)
class Measured:
    """What one backend computed: its runner, its logits on the sample per batch size (n, num_classes) and
    its top-1 predictions (n,) on the labelled split (None without one)."""

    name: str
    runner: Runner
    logits: dict[int, torch.Tensor]
    predictions: torch.Tensor | None


@dataclass(frozen=True)
class Inputs:
    """What every backend is fed: the sample images by kind ("real", "random"), the batch sizes, and the
    labelled evaluation split (None: no labelled data, so no split statistics)."""

    images: dict[str, torch.Tensor]
    batch_sizes: tuple[int, ...]
    split: DataLoader | None = None

    @cached_property
    def sample(self) -> torch.Tensor:
        return torch.cat(list(self.images.values()))  # (n, 3, H, W): real images first

    @cached_property
    def labels(self) -> torch.Tensor | None:
        return None if self.split is None else torch.cat([y for _, y in self.split])

    def measure(self, name: str, runner: Runner) -> Measured:
        """`runner`'s logits on the sample at every batch size and its predictions on the split."""
        logits = {b: _logits(runner, self.sample, b) for b in self.batch_sizes}
        if self.split is None:
            return Measured(name, runner, logits, None)
        predictions = torch.cat([runner(runner.to_device(x)).float().argmax(-1).cpu() for x, _ in self.split])
        return Measured(name, runner, logits, predictions)

    def describe(self) -> dict[str, Any]:
        return {
            **{kind: len(images) for kind, images in self.images.items()},
            "batch_sizes": list(self.batch_sizes),
            "split_images": 0 if self.labels is None else len(self.labels),
        }


def _backends(rd: RunDir, requested: list[str] | None, device: str, log) -> tuple[list[str], dict[str, str]]:
    skipped: dict[str, str] = {}
    chosen = []
    for name in requested or default_backends(rd, EXPORT_BACKENDS):
        if name not in EXPORT_BACKENDS:
            raise VitfoldError(f"--backends: unknown backend '{name}' (choose from {', '.join(EXPORT_BACKENDS)})")
        reason = backend_unavailable(rd, name, device)
        if reason and requested:
            raise VitfoldError(f"backend {name}: {reason}")
        if reason:
            skipped[name] = reason
            log(f"skip {name}: {reason}")
        else:
            chosen.append(name)
    return chosen, skipped


def _localise(runner: Runner, reference: Runner, images: torch.Tensor, precision: str) -> dict[str, Any]:
    """The first block diverging by more than the precision's default max_rel (never a loosened one)."""
    try:
        blocks = runner.block_outputs(runner.to_device(images))
    except VitfoldError as e:  # e.g. a quantized graph that lost the exporter's per-block scopes
        return {"block": None, "where": f"not localised: {e}"}
    if blocks is None:
        return {"block": None, "where": f"{runner.runtime} cannot expose block outputs; compare onnxruntime's"}
    try:
        errors = block_errors(blocks, reference.block_outputs(reference.to_device(images)))
    except VitfoldError as e:
        return {"block": None, "where": f"not localised: {e}"}
    threshold = DEFAULT_TOLERANCES[precision].max_rel or LOCALISE_WITHOUT_MAX_REL
    return first_diverging_block(errors, threshold, reference.block_names)


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


def describe_bars(loose: dict[str, float | None]) -> str:
    """'max_rel 0.001, cosine_min none': bars and their values (none: the bar is dropped)."""
    return ", ".join(f"{k} {'none' if v is None else f'{v:g}'}" for k, v in loose.items())


def judge(
    kind: str,
    precision: str,
    tolerance: Tolerance,
    checked: Measured,
    reference: Measured,
    end_to_end: Measured | None,
    inputs: Inputs,
) -> tuple[list[dict], dict[str, Any] | None]:
    """One row per batch size: `checked` against `reference` (and against `end_to_end`, when given), with
    its statistics on the labelled split when there is one, judged by `tolerance`; and, when a row fails,
    where `checked` first diverges from `reference` (None when every row passes)."""
    split = {}
    if inputs.labels is not None:
        split = split_stats(checked.predictions, reference.predictions, inputs.labels)
    rows = []
    for b, out in checked.logits.items():
        stats = {**compare(reference.logits[b], out, tolerance).stats, **split}
        row = {
            "backend": checked.name,
            "provider": checked.runner.provider,
            "kind": kind,
            "batch_size": b,
            "compared_to": reference.name,
            "precision": precision,
            **stats,
            "passed": tolerance.check(stats),
        }
        if end_to_end is not None:
            row["end_to_end"] = compare(end_to_end.logits[b], out, tolerance).stats
        rows.append(row)
    if all(r["passed"] for r in rows):
        return rows, None
    return rows, _localise(checked.runner, reference.runner, inputs.sample[:LOCALISE_IMAGES], precision)


def loosened_tolerances(
    overrides: dict[str, Any] | None, log, precisions: tuple[str, ...] = tuple(DEFAULT_TOLERANCES)
) -> tuple[dict[str, Tolerance], dict[str, dict]]:
    """The tolerances per precision with `overrides`, and the bars of `precisions` loosened beyond the
    defaults (logged)."""
    tolerances = tolerances_for(overrides)  # validates the keys first
    loosened = {p: loose for p, t in tolerances.items() if (loose := t.looser_than(DEFAULT_TOLERANCES[p]))}
    loosened = {p: loose for p, loose in loosened.items() if p in precisions}
    for precision, loose in loosened.items():
        log(f"WARNING: {precision} tolerances loosened beyond the defaults: {describe_bars(loose)}")
    return tolerances, loosened


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
        expected, folded_out = inputs.measure(UNMERGED, reference), inputs.measure(FOLDED, folded)
        rows, where = judge("fold", "fp32", tolerances["fp32"], folded_out, expected, None, inputs)
        localisation = {FOLDED: where} if where else {}
        for name in chosen:
            precision = backend_precision(rd, name)
            with open_backend(rd, name, v.device, trust=ctx.trust) as runner:
                measured = inputs.measure(name, runner)
                new, where = judge("export", precision, tolerances[precision], measured, folded_out, expected, inputs)
            rows += new
            localisation |= {name: where} if where else {}
    result = verify_result(rows, localisation, v.device, inputs, tolerances, loosened, skipped)
    return StageResult(write_results(result, out_dir, ctx.log), value=result, extra={"passed": result["passed"]})


def run_inputs(rd: RunDir, model: torch.nn.Module, v: VerifyConfig) -> Inputs:
    """The run's sample (`verify_inputs`) and its evaluation split (`v.eval_images` of it), at `model`'s size."""
    images = verify_inputs(rd, model, v.samples)
    split = _split_loader(evaluation_split(rd, model), v.eval_images, max(v.batch_sizes))
    return Inputs(images, tuple(v.batch_sizes), split)


def verify_result(
    rows: list[dict],
    localisation: dict[str, Any],
    device: str,
    inputs: Inputs,
    tolerances: dict[str, Tolerance],
    loosened: dict[str, dict],
    skipped: dict[str, str],
    **extra: Any,
) -> dict[str, Any]:
    """verify.json's content: `passed` (every row passed), the inputs, tolerances and rows."""
    return {
        "passed": all(r["passed"] for r in rows),
        **extra,
        "device": device,
        "inputs": inputs.describe(),
        "tolerances": {p: t.to_dict() for p, t in tolerances.items()},
        "loosened": loosened,
        "results": rows,
        "localisation": localisation,
        "skipped": skipped,
    }


def write_results(result: dict[str, Any], out_dir: Path, log) -> list[Path]:
    """verify.json, verify.md and junit.xml of `result` in `out_dir` (each atomic); log the rows and verdict."""
    outputs = [out_dir / "verify.json", out_dir / "verify.md", out_dir / "junit.xml"]
    atomic_write_json(outputs[0], result)
    atomic_write_text(outputs[1], _markdown(result))
    atomic_write_text(outputs[2], _junit(result))
    for row in result["results"]:
        log(_summary_line(row))
    for name, where in result["localisation"].items():
        log(f"{name}: first divergence at {where['where']}")
    log(f"verify: {'PASSED' if result['passed'] else 'FAILED'}")
    return outputs


def _inputs(rd: RunDir, v: VerifyConfig) -> list[Path]:
    """The adapter, the folded model and every artifact the export stage recorded, verified or skipped."""
    return list(dict.fromkeys([*backend_files(rd, UNMERGED), rd.folded, *recorded_outputs(rd, "export")]))


VERIFY = Stage("verify", section="verify", inputs=_inputs, run=_run)


def _split_text(row: dict[str, Any]) -> str:
    """'split: agree 0.9990  acc 0.9120 (-0.10 pts)', or '' for a row with no labelled split."""
    if "split_top1_agreement" not in row:
        return ""
    return (
        f"split: agree {row['split_top1_agreement']:.4f}  acc {row['split_accuracy']:.4f} "
        f"({row['accuracy_delta']:+.2f} pts)"
    )


def _elementwise_text(row: dict[str, Any]) -> str:
    """'atol_needed 1.2e-06 at rtol 1e-05 (0 mismatches)', or '' for a row without the elementwise bar."""
    if "atol_needed" not in row:
        return ""
    return f"atol_needed {row['atol_needed']:.2e} at rtol {row['rtol']:g} ({row['elementwise_mismatches']} mismatches)"


def _summary_line(row: dict[str, Any]) -> str:
    verdict = "pass" if row["passed"] else "FAIL"
    parts = [
        f"{verdict}  {row['kind']:6s} {row['backend']:12s} batch {row['batch_size']:3d}  vs {row['compared_to']}:",
        f"max_rel {row['max_rel']:.2e}  cos_min {row['cosine_min']:.6f}  top1 {row['top1_agreement']:.3f}",
        _elementwise_text(row),
        _split_text(row),
    ]
    return "  ".join(p for p in parts if p)


def _inputs_text(result: dict[str, Any]) -> str:
    inputs = result["inputs"]
    shown = f"batch sizes {', '.join(map(str, inputs['batch_sizes']))}, device {result['device']}"
    if not inputs["split_images"]:
        return (
            f"Inputs: {inputs['random']} seeded random images at the reference's input size, {shown}; no labelled "
            "data, so no split agreement or accuracy."
        )
    return (
        f"Inputs: {inputs['real']} evaluation images + {inputs['random']} random images, {shown}; "
        f"the whole evaluation split ({inputs['split_images']} images) for agreement and accuracy."
    )


def _cell(row: dict[str, Any], key: str, spec: str) -> str:
    return format(row[key], spec) if key in row else "–"


def _markdown(result: dict[str, Any]) -> str:
    artifact = result.get("artifact")
    elementwise = any("atol_needed" in r for r in result["results"])
    lines = [f"# verify: {'PASSED' if result['passed'] else 'FAILED'}", ""]
    if artifact:
        lines.append(
            f"Artifact `{artifact['path']}` ({artifact['runtime']}, sha256 `{artifact['sha256'][:16]}…`) against "
            f"{result['reference']}."
        )
    lines += [
        _inputs_text(result),
        "Fold rows compare torch-folded with torch-unmerged; export and artifact rows compare the artifact with "
        "the folded model (end-to-end max_rel vs torch-unmerged in its own column, when there is one). Split "
        "agreement: top-1 agreement with that reference on the evaluation split; accuracy: on the split, with its "
        "change from the reference's. max_rel = max |Δ| / max |reference logit|.",
        "",
        "| kind | backend | precision | provider | batch | max_abs | max_rel | p99_abs | cosine_min | top-1 | KL "
        + ("| atol needed (rtol) | mismatches " if elementwise else "")
        + "| end-to-end max_rel | split agreement | split accuracy (Δ pts) | verdict |",
        "|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|" + ("--:|--:|" if elementwise else "") + "--:|--:|--:|---|",
    ]
    for r in result["results"]:
        own = r["max_rel"] if r["compared_to"] == UNMERGED else None  # a fold row is end-to-end itself
        e2e = r["end_to_end"]["max_rel"] if "end_to_end" in r else own
        e2e = "–" if e2e is None else f"{e2e:.2e}"
        accuracy = f"{r['split_accuracy']:.4f} ({r['accuracy_delta']:+.2f})" if "split_accuracy" in r else "–"
        atol = (
            f"{r['atol_needed']:.2e} ({r['rtol']:g}) | {r['elementwise_mismatches']} | " if "rtol" in r else "– | – | "
        )
        lines.append(
            f"| {r['kind']} | {r['backend']} | {r['precision']} | {r['provider']} | {r['batch_size']} | "
            f"{r['max_abs']:.2e} | {r['max_rel']:.2e} | {r['p99_abs']:.2e} | {r['cosine_min']:.7f} | "
            f"{r['top1_agreement']:.3f} | {r['kl_mean']:.1e} | {atol if elementwise else ''}{e2e} | "
            f"{_cell(r, 'split_top1_agreement', '.4f')} | {accuracy} | {'pass' if r['passed'] else '**FAIL**'} |"
        )
    tol = "; ".join(f"{p}: " + ", ".join(f"{k} {v:g}" for k, v in t.items()) for p, t in result["tolerances"].items())
    lines += ["", f"Tolerances ({tol})."]
    for precision, loose in result["loosened"].items():
        lines.append(f"- **WARNING: {precision} tolerances loosened beyond the defaults: {describe_bars(loose)}.**")
    for name, where in result["localisation"].items():
        lines.append(f"- **{name}** first diverges at `{where['where']}`.")
    for name, reason in result["skipped"].items():
        lines.append(f"- {name} not verified: {reason}.")
    return "\n".join(lines) + "\n"


def _junit(result: dict[str, Any]) -> str:
    cases = []
    for r in result["results"]:
        name = quoteattr(f"{r['kind']}.{r['backend']}.batch{r['batch_size']}")
        body = ""
        if not r["passed"]:
            where = result["localisation"].get(r["backend"], {}).get("where", "")
            parts = [
                f"max_rel {r['max_rel']:.3e}, cosine_min {r['cosine_min']:.7f}, top1 {r['top1_agreement']:.3f}",
                _elementwise_text(r),
                _split_text(r),
                f"first divergence at {where}" if where else "",
            ]
            body = f"<failure message={quoteattr('; '.join(p for p in parts if p))}/>"
        cases.append(f'  <testcase classname="vitfold.verify" name={name}>{body}</testcase>')
    cases += [
        f'  <testcase classname="vitfold.verify" name={quoteattr("export." + n)}><skipped message={quoteattr(why)}/>'
        "</testcase>"
        for n, why in result["skipped"].items()
    ]
    failures = sum(not r["passed"] for r in result["results"])
    properties = "".join(
        f'    <property name={quoteattr(f"loosened.{p}.{k}")} value="{"none" if v is None else f"{v:g}"}"/>\n'
        for p, loose in result["loosened"].items()
        for k, v in loose.items()
    )
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<testsuite name="vitfold verify" tests="{len(cases)}" '
        f'failures="{failures}" skipped="{len(result["skipped"])}">\n'
        + (f"  <properties>\n{properties}  </properties>\n" if properties else "")
        + "\n".join(cases)
        + "\n</testsuite>\n"
    )
