"""The gate: what an artifact is fed, what it computes, how it is judged and where it diverges, for any
artifact and any reference, with no run directory (the verify stage, `verify --artifact`, bench and report are
its consumers).

    inputs = Inputs({"real": images, "random": noise}, batch_sizes=(1, 8), split=loader)
    reference, checked = inputs.measure("torch-folded", ref_runner), inputs.measure("onnxruntime", runner)
    rows, where = judge("export", "fp32", tolerance, checked, reference, None, inputs)
    result = gate_result(rows, {"onnxruntime": where} if where else {}, "cpu", inputs, tolerances, {}, {})
    render_markdown(result), render_junit(result), summary_lines(result)   # one renderer for every consumer

Rows: one per (artifact, batch size), the statistics of `vitfold.export.comparison` judged by the precision's
`Tolerance`. When a row fails, `localise` names the first transformer block whose output diverges (forward
hooks in PyTorch, extra graph outputs in ONNX), or says why it cannot.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
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
from vitfold.export.runners import Runner

LOCALISE_IMAGES = 4


def progress(iterable: Iterable, desc: str) -> Iterable:
    """A bar over `iterable` on an interactive terminal (stderr), nothing otherwise (logs get one line per
    phase from the caller), as training does."""
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, leave=False, disable=not sys.stderr.isatty(), dynamic_ncols=True)


LOCALISE_WITHOUT_MAX_REL = 0.1  # block threshold for a precision judged on the split alone (int8)


def random_images(
    mean: tuple[float, ...], std: tuple[float, ...], size: tuple[int, int], n: int, g: torch.Generator
) -> torch.Tensor:
    """`n` seeded images (n, 3, H, W), uniform in [0, 1] per pixel, then normalised: (x − mean) / std."""
    mean_, std_ = (torch.tensor(v).view(1, 3, 1, 1) for v in (mean, std))
    return (torch.rand(n, 3, *size, generator=g) - mean_) / std_


def _logits(runner: Runner, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    outs = [runner(runner.to_device(chunk)).float().cpu() for chunk in images.split(batch_size)]
    return torch.cat(outs)  # (n, num_classes)


def split_loader(split: Dataset, images: int | None, batch_size: int, seed: int = 0) -> DataLoader:
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

    def measure(self, name: str, runner: Runner, log: Callable[[str], None] | None = None) -> Measured:
        """`runner`'s logits on the sample at every batch size and its predictions on the split; a progress bar
        over the split on a terminal, and one line when done (`log`)."""
        started = time.perf_counter()
        logits = {b: _logits(runner, self.sample, b) for b in self.batch_sizes}
        predictions = None
        if self.split is not None:
            batches = progress(self.split, f"{name}: evaluation split")
            predictions = torch.cat([runner(runner.to_device(x)).float().argmax(-1).cpu() for x, _ in batches])
        if log is not None:
            split = "" if self.labels is None else f" and the evaluation split ({len(self.labels)} images)"
            log(f"measured {name}: {len(self.sample)} sample images{split} ({time.perf_counter() - started:.1f} s)")
        return Measured(name, runner, logits, predictions)

    def describe(self) -> dict[str, Any]:
        return {
            **{kind: len(images) for kind, images in self.images.items()},
            "batch_sizes": list(self.batch_sizes),
            "split_images": 0 if self.labels is None else len(self.labels),
        }


def localise(runner: Runner, reference: Runner, images: torch.Tensor, precision: str) -> dict[str, Any]:
    """The first block diverging by more than the precision's default max_rel (never a loosened one)."""
    try:
        blocks = runner.block_outputs(runner.to_device(images))
    except VitfoldError as e:  # a graph without block scopes: "no block boundaries in this graph (...)"
        return {"block": None, "where": str(e)}
    if blocks is None:
        return {"block": None, "where": f"{runner.runtime} cannot expose block outputs; compare onnxruntime's"}
    try:
        errors = block_errors(blocks, reference.block_outputs(reference.to_device(images)))
    except VitfoldError as e:
        return {"block": None, "where": f"not localised: {e}"}
    threshold = DEFAULT_TOLERANCES[precision].max_rel or LOCALISE_WITHOUT_MAX_REL
    return first_diverging_block(errors, threshold, reference.block_names)


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
    return rows, localise(checked.runner, reference.runner, inputs.sample[:LOCALISE_IMAGES], precision)


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


def gate_result(
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


def divergence_text(where: dict[str, Any], quote: str = "") -> str:
    """'first divergence at blocks.3' (or after the last block), or why no block could be named."""
    if where["block"] is None and not where["where"].startswith("after"):
        return where["where"]
    return f"first divergence at {quote}{where['where']}{quote}"


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


def render_markdown(result: dict[str, Any]) -> str:
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
        own = r["max_rel"] if r["kind"] == "fold" else None  # a fold row is end-to-end itself
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
        lines.append(f"- **{name}**: {divergence_text(where, '`')}.")
    for name, reason in result["skipped"].items():
        lines.append(f"- {name} not verified: {reason}.")
    return "\n".join(lines) + "\n"


def render_junit(result: dict[str, Any]) -> str:
    cases = []
    for r in result["results"]:
        name = quoteattr(f"{r['kind']}.{r['backend']}.batch{r['batch_size']}")
        body = ""
        if not r["passed"]:
            where = result["localisation"].get(r["backend"])
            parts = [
                f"max_rel {r['max_rel']:.3e}, cosine_min {r['cosine_min']:.7f}, top1 {r['top1_agreement']:.3f}",
                _elementwise_text(r),
                _split_text(r),
                divergence_text(where) if where else "",
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


def summary_lines(result: dict[str, Any]) -> list[str]:
    """The log of a gate result: one line per row, where each failing artifact diverges, the verdict."""
    lines = [_summary_line(row) for row in result["results"]]
    lines += [f"{name}: {divergence_text(where)}" for name, where in result["localisation"].items()]
    return [*lines, f"verify: {'PASSED' if result['passed'] else 'FAILED'}"]
