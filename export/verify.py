"""The verify stage: does every artifact compute what the adapted (unmerged) model computes?

Inputs: a fixed, seeded sample of the run's evaluation images plus as many seeded random images at the
model's normalisation, run at each requested batch size (1 and the largest, by default).

Two separate questions, two kinds of rows:
- fold:   torch-folded vs torch-unmerged (did folding change the function?)
- export: each artifact vs torch-folded (did exporting change it?), with its end-to-end statistics vs
          torch-unmerged beside them.
So a wrong fold fails the fold row while every faithful export of it still passes, and a broken export
fails only its own row. Statistics and tolerances: `export.compare`. When a row fails, the first
transformer block whose output diverges is named (forward hooks in PyTorch, extra graph outputs in ONNX).

Writes verify/verify.json, verify/verify.md and verify/junit.xml; `passed` is false on any mismatch.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

import torch

from export.compare import block_errors, first_diverging_block, logit_stats, tolerance_for
from export.models import run_config
from export.runners import Runner, default_backends, open_runner, runner_inputs, unavailable
from pipeline.errors import VitfoldError
from pipeline.manifest import record_stage
from pipeline.run import atomic_write_json, atomic_write_text

REFERENCE, FOLDED = "torch-unmerged", "torch-folded"
EXPORT_BACKENDS = ("torchscript", "onnxruntime", "onnxruntime-fp16", "aoti", "tensorrt")
LOCALISE_IMAGES = 4


def verify_inputs(run_dir: Path, samples: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """`samples` real evaluation images (seeded choice) and `samples` seeded random images, (n, 3, H, W)."""
    from pipeline.data import build_splits, parse_data_spec
    from pipeline.train import input_transform

    cfg = run_config(run_dir)
    g = torch.Generator().manual_seed(seed)
    transform = input_transform(cfg)
    evaluation = build_splits(parse_data_spec(cfg.data), transform).eval
    picks = torch.randperm(len(evaluation), generator=g)[:samples].tolist()
    real = torch.stack([evaluation[i][0] for i in picks])
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (transform.mean, transform.std))
    noise = (torch.rand(samples, 3, *transform.size, generator=g) - mean) / std
    return {"real": real, "random": noise}


def _logits(runner: Runner, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    outs = [runner(runner.to_device(chunk)).float().cpu() for chunk in images.split(batch_size)]
    return torch.cat(outs)  # (n, num_classes)


def _precision(run_dir: Path, backend: str) -> str:
    """fp16 for the fp16 ONNX and for a TensorRT plan built in fp16."""
    if backend == "onnxruntime-fp16":
        return "fp16"
    info = run_dir / "export" / "model.json"
    if backend == "tensorrt" and info.is_file():
        return json.loads(info.read_text()).get("precision", "fp32")
    return "fp32"


def _backends(run_dir: Path, requested: list[str] | None, device: str, log) -> tuple[list[str], dict[str, str]]:
    skipped: dict[str, str] = {}
    chosen = []
    for name in requested or default_backends(run_dir, EXPORT_BACKENDS):
        if name not in EXPORT_BACKENDS:
            raise VitfoldError(f"--backends: unknown backend '{name}' (choose from {', '.join(EXPORT_BACKENDS)})")
        reason = unavailable(name, run_dir, device)
        if reason and requested:
            raise VitfoldError(f"backend {name}: {reason}")
        if reason:
            skipped[name] = reason
            log(f"skip {name}: {reason}")
        else:
            chosen.append(name)
    return chosen, skipped


def _localise(runner: Runner, reference: Runner, images: torch.Tensor, threshold: float) -> dict[str, Any]:
    blocks = runner.block_outputs(runner.to_device(images))
    if blocks is None:
        return {"block": None, "where": f"{runner.name} cannot expose block outputs; compare onnxruntime's"}
    return first_diverging_block(block_errors(blocks, reference.block_outputs(reference.to_device(images))), threshold)


def verify_stage(
    run_dir: Path,
    backends: list[str] | None = None,
    batch_sizes: tuple[int, ...] = (1, 8),
    samples: int = 16,
    device: str = "cpu",
    tolerance_overrides: dict[str, float] | None = None,
    log=print,
) -> dict[str, Any]:
    """Compare fold and every available (or requested) export; write verify/*; returns verify.json's content."""
    started = time.perf_counter()
    chosen, skipped = _backends(run_dir, backends, device, log)
    images = verify_inputs(run_dir, samples)
    everything = torch.cat(list(images.values()))
    reference = open_runner(REFERENCE, run_dir, device)
    folded = open_runner(FOLDED, run_dir, device)
    rows, localisation = [], {}
    try:
        expected = {b: _logits(reference, everything, b) for b in batch_sizes}
        folded_out = {b: _logits(folded, everything, b) for b in batch_sizes}
        fold_tol = tolerance_for("fp32", tolerance_overrides)
        for b in batch_sizes:
            stats = logit_stats(folded_out[b], expected[b])
            rows.append(
                {
                    "backend": FOLDED,
                    "device": folded.provider,
                    "kind": "fold",
                    "batch_size": b,
                    "compared_to": REFERENCE,
                    "precision": "fp32",
                    **stats,
                    "passed": fold_tol.check(stats),
                }
            )
        if not all(r["passed"] for r in rows):
            localisation[FOLDED] = _localise(folded, reference, images["real"][:LOCALISE_IMAGES], fold_tol.max_rel)
        for name in chosen:
            runner = open_runner(name, run_dir, device)
            precision = _precision(run_dir, name)
            tol = tolerance_for(precision, tolerance_overrides)
            try:
                for b in batch_sizes:
                    out = _logits(runner, everything, b)
                    stats = logit_stats(out, folded_out[b])
                    rows.append(
                        {
                            "backend": name,
                            "device": runner.provider,
                            "kind": "export",
                            "batch_size": b,
                            "compared_to": FOLDED,
                            "precision": precision,
                            **stats,
                            "passed": tol.check(stats),
                            "end_to_end": logit_stats(out, expected[b]),
                        }
                    )
                if not all(r["passed"] for r in rows if r["backend"] == name):
                    localisation[name] = _localise(runner, folded, images["real"][:LOCALISE_IMAGES], tol.max_rel)
            finally:
                runner.close()
    finally:
        reference.close()
        folded.close()
    result = {
        "passed": all(r["passed"] for r in rows),
        "device": device,
        "inputs": {"real": len(images["real"]), "random": len(images["random"]), "batch_sizes": list(batch_sizes)},
        "tolerances": {p: tolerance_for(p, tolerance_overrides).to_dict() for p in ("fp32", "fp16")},
        "results": rows,
        "localisation": localisation,
        "skipped": skipped,
    }
    _write(run_dir, result, time.perf_counter() - started)
    for row in rows:
        log(_summary_line(row))
    for name, where in localisation.items():
        log(f"{name}: first divergence at {where['where']}")
    log(f"verify: {'PASSED' if result['passed'] else 'FAILED'}")
    return result


def _summary_line(row: dict[str, Any]) -> str:
    verdict = "pass" if row["passed"] else "FAIL"
    return (
        f"{verdict}  {row['kind']:6s} {row['backend']:12s} batch {row['batch_size']:3d}  vs {row['compared_to']}: "
        f"max_rel {row['max_rel']:.2e}  cos_min {row['cosine_min']:.6f}  top1 {row['top1_agreement']:.3f}"
    )


def _markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# verify: {'PASSED' if result['passed'] else 'FAILED'}",
        "",
        f"Inputs: {result['inputs']['real']} evaluation images + {result['inputs']['random']} random images, "
        f"batch sizes {', '.join(map(str, result['inputs']['batch_sizes']))}, device {result['device']}.",
        "Fold rows compare torch-folded with torch-unmerged; export rows compare each artifact with torch-folded "
        "(end-to-end max_rel vs torch-unmerged in the last column).",
        "",
        "| kind | backend | device | batch | max_abs | max_rel | p99_abs | cosine_min | top-1 | KL "
        "| end-to-end max_rel | verdict |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in result["results"]:
        e2e = f"{r['end_to_end']['max_rel']:.2e}" if "end_to_end" in r else f"{r['max_rel']:.2e}"
        lines.append(
            f"| {r['kind']} | {r['backend']} | {r['device']} | {r['batch_size']} | {r['max_abs']:.2e} | "
            f"{r['max_rel']:.2e} | {r['p99_abs']:.2e} | {r['cosine_min']:.7f} | {r['top1_agreement']:.3f} | "
            f"{r['kl_mean']:.1e} | {e2e} | {'pass' if r['passed'] else '**FAIL**'} |"
        )
    tol = "; ".join(f"{p}: " + ", ".join(f"{k} {v:g}" for k, v in t.items()) for p, t in result["tolerances"].items())
    lines += ["", f"Tolerances ({tol})."]
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
            message = f"max_rel {r['max_rel']:.3e}, cosine_min {r['cosine_min']:.7f}, top1 {r['top1_agreement']:.3f}"
            body = f"<failure message={quoteattr(message + (f'; first divergence at {where}' if where else ''))}/>"
        cases.append(f'  <testcase classname="vitfold.verify" name={name}>{body}</testcase>')
    cases += [
        f'  <testcase classname="vitfold.verify" name={quoteattr("export." + n)}><skipped message={quoteattr(why)}/>'
        "</testcase>"
        for n, why in result["skipped"].items()
    ]
    failures = sum(not r["passed"] for r in result["results"])
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<testsuite name="vitfold verify" tests="{len(cases)}" '
        f'failures="{failures}" skipped="{len(result["skipped"])}">\n' + "\n".join(cases) + "\n</testsuite>\n"
    )


def _write(run_dir: Path, result: dict[str, Any], seconds: float) -> None:
    out = run_dir / "verify"
    atomic_write_json(out / "verify.json", result)
    atomic_write_text(out / "verify.md", _markdown(result))
    atomic_write_text(out / "junit.xml", _junit(result))
    # every artifact present, verified or skipped: `vitfold run` compares these with what export wrote
    files = dict.fromkeys(f for name in (REFERENCE, FOLDED, *EXPORT_BACKENDS) for f in runner_inputs(name))
    inputs = [run_dir / f for f in files if (run_dir / f).is_file()]
    record_stage(
        run_dir,
        "verify",
        inputs,
        [out / "verify.json", out / "verify.md", out / "junit.xml"],
        seconds,
        passed=result["passed"],
    )
