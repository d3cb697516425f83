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

EXPORT_BACKENDS = (
    "torchscript",
    "onnxruntime",
    "onnxruntime-fp16",
    "onnxruntime-int8",
    "aoti",
    "aoti-fp16",
    "aoti-bf16",
    "tensorrt",
)
LOCALISE_IMAGES = 4
LOCALISE_WITHOUT_MAX_REL = 0.1  # block threshold for a precision judged on the split alone (int8)


def evaluation_split(rd: RunDir, model: torch.nn.Module) -> Dataset:
    """The run's evaluation split at `model`'s input size and the run's normalisation."""
    return build_splits(parse_data_spec(rd.config.data), data_transform(rd.config, model)).eval


def verify_inputs(rd: RunDir, model: torch.nn.Module, samples: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """`samples` real evaluation images (seeded choice) and `samples` seeded random images, (n, 3, H, W),
    at `model`'s input size and the run's normalisation."""
    g = torch.Generator().manual_seed(seed)
    transform = data_transform(rd.config, model)
    evaluation = evaluation_split(rd, model)
    picks = torch.randperm(len(evaluation), generator=g)[:samples].tolist()
    real = torch.stack([evaluation[i][0] for i in picks])
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (transform.mean, transform.std))
    noise = (torch.rand(samples, 3, *transform.size, generator=g) - mean) / std
    return {"real": real, "random": noise}


def _logits(runner: Runner, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    outs = [runner(runner.to_device(chunk)).float().cpu() for chunk in images.split(batch_size)]
    return torch.cat(outs)  # (n, num_classes)


def _split_loader(split: Dataset, images: int | None, batch_size: int, seed: int = 0) -> DataLoader:
    """The evaluation split, or a seeded choice of `images` of it, in batches of `batch_size`."""
    if images is not None and images < len(split):
        split = Subset(split, torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:images])
    return DataLoader(split, batch_size=batch_size)


def _predictions(runner: Runner, loader: DataLoader) -> torch.Tensor:
    """Top-1 prediction (n,) of every image of `loader`."""
    return torch.cat([runner(runner.to_device(x)).float().argmax(-1).cpu() for x, _ in loader])


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


def _check_writable(folder: Path) -> None:
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


def _rows(
    name: str,
    runner: Runner,
    kind: str,
    against: str,
    precision: str,
    outputs: dict[int, torch.Tensor],
    references: dict[int, torch.Tensor],
    tolerance: Tolerance,
    end_to_end: dict[int, torch.Tensor] | None,
    split: dict[str, float],
) -> list[dict]:
    """One row per batch size: `outputs` against `references` (and against `end_to_end`, when given),
    with the backend's statistics on the evaluation split (`split`), judged by `tolerance`."""
    rows = []
    for b, out in outputs.items():
        stats = {**compare(references[b], out, tolerance).stats, **split}
        row = {
            "backend": name,
            "provider": runner.provider,
            "kind": kind,
            "batch_size": b,
            "compared_to": against,
            "precision": precision,
            **stats,
            "passed": tolerance.check(stats),
        }
        if end_to_end is not None:
            row["end_to_end"] = compare(end_to_end[b], out, tolerance).stats
        rows.append(row)
    return rows


def _run(rd: RunDir, v: VerifyConfig, ctx: Context) -> StageResult:
    """Compare fold and every available (or requested) export; write verify/*; the value is verify.json's."""
    batch_sizes = tuple(v.batch_sizes)
    tolerances = tolerances_for(v.tolerances)  # validates the keys first
    loosened = {p: loose for p, t in tolerances.items() if (loose := t.looser_than(DEFAULT_TOLERANCES[p]))}
    for precision, loose in loosened.items():
        ctx.log(f"WARNING: {precision} tolerances loosened beyond the defaults: {describe_bars(loose)}")
    chosen, skipped = _backends(rd, v.backends, v.device, ctx.log)
    if not chosen and not v.allow_no_export:
        why = "; ".join(f"{name}: {reason}" for name, reason in skipped.items())
        raise VitfoldError(f"verify: no exported artifact to check ({why}); --allow-no-export checks the fold alone")
    for name in chosen:  # a changed, unrecorded or untrusted artifact stops verify before any work
        checked_artifact(rd, name, ctx.trust)
    out_dir = ctx.out_dir or rd.verify_dir
    _check_writable(out_dir)  # before minutes of work, not after
    rows, localisation = [], {}
    unmerged = unmerged_model(rd)
    images = verify_inputs(rd, unmerged, v.samples)
    loader = _split_loader(evaluation_split(rd, unmerged), v.eval_images, max(batch_sizes))
    labels = torch.cat([y for _, y in loader])
    with open_runner("torch", unmerged, v.device) as reference, open_backend(rd, FOLDED, v.device) as folded:
        everything = torch.cat(list(images.values()))
        expected = {b: _logits(reference, everything, b) for b in batch_sizes}
        folded_out = {b: _logits(folded, everything, b) for b in batch_sizes}
        reference_predictions, folded_predictions = _predictions(reference, loader), _predictions(folded, loader)
        split = split_stats(folded_predictions, reference_predictions, labels)
        rows += _rows(FOLDED, folded, "fold", UNMERGED, "fp32", folded_out, expected, tolerances["fp32"], None, split)
        if not all(r["passed"] for r in rows):
            localisation[FOLDED] = _localise(folded, reference, images["real"][:LOCALISE_IMAGES], "fp32")
        for name in chosen:
            precision = backend_precision(rd, name)
            tol = tolerances[precision]
            with open_backend(rd, name, v.device, trust=ctx.trust) as runner:
                outputs = {b: _logits(runner, everything, b) for b in batch_sizes}
                split = split_stats(_predictions(runner, loader), folded_predictions, labels)
                new = _rows(name, runner, "export", FOLDED, precision, outputs, folded_out, tol, expected, split)
                if not all(r["passed"] for r in new):
                    localisation[name] = _localise(runner, folded, images["real"][:LOCALISE_IMAGES], precision)
            rows += new
    result = {
        "passed": all(r["passed"] for r in rows),
        "device": v.device,
        "inputs": {
            "real": len(images["real"]),
            "random": len(images["random"]),
            "batch_sizes": list(batch_sizes),
            "split_images": len(labels),
        },
        "tolerances": {p: t.to_dict() for p, t in tolerances.items()},
        "loosened": loosened,
        "results": rows,
        "localisation": localisation,
        "skipped": skipped,
    }
    outputs = [out_dir / "verify.json", out_dir / "verify.md", out_dir / "junit.xml"]
    atomic_write_json(outputs[0], result)
    atomic_write_text(outputs[1], _markdown(result))
    atomic_write_text(outputs[2], _junit(result))
    for row in rows:
        ctx.log(_summary_line(row))
    for name, where in localisation.items():
        ctx.log(f"{name}: first divergence at {where['where']}")
    ctx.log(f"verify: {'PASSED' if result['passed'] else 'FAILED'}")
    return StageResult(outputs, value=result, extra={"passed": result["passed"]})


def _inputs(rd: RunDir, v: VerifyConfig) -> list[Path]:
    """The adapter, the folded model and every artifact the export stage recorded, verified or skipped."""
    return list(dict.fromkeys([*backend_files(rd, UNMERGED), rd.folded, *recorded_outputs(rd, "export")]))


VERIFY = Stage("verify", section="verify", inputs=_inputs, run=_run)


def _summary_line(row: dict[str, Any]) -> str:
    verdict = "pass" if row["passed"] else "FAIL"
    return (
        f"{verdict}  {row['kind']:6s} {row['backend']:12s} batch {row['batch_size']:3d}  vs {row['compared_to']}: "
        f"max_rel {row['max_rel']:.2e}  cos_min {row['cosine_min']:.6f}  top1 {row['top1_agreement']:.3f}  "
        f"split: agree {row['split_top1_agreement']:.4f}  acc {row['split_accuracy']:.4f} "
        f"({row['accuracy_delta']:+.2f} pts)"
    )


def _markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# verify: {'PASSED' if result['passed'] else 'FAILED'}",
        "",
        f"Inputs: {result['inputs']['real']} evaluation images + {result['inputs']['random']} random images, "
        f"batch sizes {', '.join(map(str, result['inputs']['batch_sizes']))}, device {result['device']}; "
        f"the whole evaluation split ({result['inputs']['split_images']} images) for agreement and accuracy.",
        "Fold rows compare torch-folded with torch-unmerged; export rows compare each artifact with torch-folded "
        "(end-to-end max_rel vs torch-unmerged in its own column). Split agreement: top-1 agreement with that "
        "reference on the evaluation split; accuracy: on the split, with its change from the reference's.",
        "",
        "| kind | backend | precision | provider | batch | max_abs | max_rel | p99_abs | cosine_min | top-1 | KL "
        "| end-to-end max_rel | split agreement | split accuracy (Δ pts) | verdict |",
        "|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in result["results"]:
        e2e = f"{r['end_to_end']['max_rel']:.2e}" if "end_to_end" in r else f"{r['max_rel']:.2e}"
        lines.append(
            f"| {r['kind']} | {r['backend']} | {r['precision']} | {r['provider']} | {r['batch_size']} | "
            f"{r['max_abs']:.2e} | {r['max_rel']:.2e} | {r['p99_abs']:.2e} | {r['cosine_min']:.7f} | "
            f"{r['top1_agreement']:.3f} | {r['kl_mean']:.1e} | {e2e} | {r['split_top1_agreement']:.4f} | "
            f"{r['split_accuracy']:.4f} ({r['accuracy_delta']:+.2f}) | {'pass' if r['passed'] else '**FAIL**'} |"
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
            message = (
                f"max_rel {r['max_rel']:.3e}, cosine_min {r['cosine_min']:.7f}, top1 {r['top1_agreement']:.3f}, "
                f"split agreement {r['split_top1_agreement']:.4f}, accuracy change {r['accuracy_delta']:+.2f} pts"
            )
            body = f"<failure message={quoteattr(message + (f'; first divergence at {where}' if where else ''))}/>"
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
