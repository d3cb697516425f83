"""RUN/REPORT.md: what ran, where, with which settings, and the three tables (accuracy per method,
equivalence per backend, latency per backend) with the latency chart and the verdicts. Built only from
the files the stages wrote, so it can be regenerated at any time (`vitfold report RUN`)."""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from vitfold.export.charts import CHART_EXTRA
from vitfold.export.gate import describe_bars, render_markdown
from vitfold.export.isa import cpu_name
from vitfold.pipeline.atomic import atomic_write_text
from vitfold.pipeline.config import RunConfig
from vitfold.pipeline.stages.backends import recorded_artifacts
from vitfold.pipeline.stages.bench import ratio_line
from vitfold.pipeline.stages.manifest import read_manifest, staleness
from vitfold.pipeline.stages.rundir import RunDir
from vitfold.pipeline.stages.stage import Context, Stage, StageResult
from vitfold.pipeline.stages.verify import VERIFY


def _machine() -> str:
    import torch

    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    system = f"{platform.system()} {platform.release()}"
    return f"{system}, {cpu_name()} ({_cores()} cores){gpu}; Python {platform.python_version()}"


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _table(header: list[str], rows: list[list[Any]], align: str) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"] + [
        "| " + " | ".join(map(str, r)) + " |" for r in rows
    ]


def _pm(mean: float, std: float) -> str:
    return f"{mean:.3f} ± {std:.3f}"


def _selected_by(summary: dict[str, Any]) -> str:
    """Which epoch the folded adapter is: the last, or the best on the named validation split (its size)."""
    select = summary["splits"]["select"]
    if summary["select"] == "best-val" and select:
        return f"best on {select['split']} ({select['images']:,} images)"
    return "last epoch (no selection)"


def _share_of_backbone(method: dict[str, Any]) -> str:
    """Trainable parameters as a share of the backbone's; "full" for full fine-tuning (all of it, + the head)."""
    if method["method"] == "full":
        return "full"
    return f"{method['trainable_params'] / method['backbone_params']:.2%}"


def _accuracy(compare: dict[str, Any]) -> list[str]:
    """One row per method: accuracy of the folded epoch as mean ± std over seeds, the split that selected
    it, and the best evaluation accuracy over epochs as a labelled extra (chosen by looking at that split)."""
    methods = compare["methods"]
    evaluated = methods[0]["splits"]["eval"]
    where = f"{evaluated['split']}, {evaluated['images']:,} images"
    rows = [
        [
            r["method"] + (" (this run)" if r.get("includes_this_run") else " (this run's method)" if i == 0 else ""),
            f"{r['trainable_params']:,}",
            _share_of_backbone(r),
            _pm(r["acc_mean"], r["acc_std"]),
            _selected_by(r),
            _pm(r["best_eval_acc_mean"], r["best_eval_acc_std"]),
            r["epochs"],
            r["lr"],
            ", ".join(map(str, r["seeds"])),
        ]
        for i, r in enumerate(methods)
    ]
    header = [
        "method",
        "trainable params (adapter + head)",
        "of backbone",
        f"acc of the folded epoch ({where}), mean ± std",
        "folded epoch",
        f"extra: best {evaluated['split']} acc over epochs (selected on {evaluated['split']} itself)",
        "epochs",
        "lr",
        "seeds",
    ]
    seeds = compare["seeds"]
    notes = [
        "",
        f"Mean ± sample standard deviation over {len(seeds)} seed(s) ({', '.join(map(str, seeds))}): "
        "a difference within about one standard deviation is noise. The extra column picks each run's best epoch "
        f"on the {evaluated['split']} split it reports, so it is optimistic; it is not the folded model.",
    ]
    return _table(header, rows, ["---", "--:", "--:", "--:", "---", "--:", "--:", "--:", "---"]) + notes


def _equivalence(verify: dict[str, Any]) -> list[str]:
    """verify.md's table and notes (the gate's one renderer), without its heading."""
    return render_markdown(verify).splitlines()[2:]


# the backends every latency row is also given as a speed-up over (their p50 / the row's, same batch size)
SPEEDUP_OVER = ("torch-unmerged", "onnxruntime")


def _speedups(bench: dict[str, Any], row: dict[str, Any]) -> list[str]:
    """The row's speed-up over each backend of SPEEDUP_OVER at its batch size ("–" where that one did not run)."""
    p50 = {(r["backend"], r["batch_size"]): r["p50_ms"] for r in bench["rows"]}
    over = (p50.get((name, row["batch_size"])) for name in SPEEDUP_OVER)
    return ["–" if base is None else f"{base / row['p50_ms']:.2f}×" for base in over]


REFERENCE = "torch-unmerged"  # what every gate measures against (through the fold)
NOT_ADAPTED = "torch-base"  # the base model without the adapters: another function, never gated


def gates(verify: dict[str, Any] | None, fresh: bool) -> dict[str, str]:
    """backend -> "passed" | "FAILED" from verify.json's rows (a backend passes when every one of its rows
    did); "stale" for each while verify's inputs are no longer the run's artifacts."""
    found: dict[str, str] = {}
    for row in (verify or {}).get("results", []):
        passed = row["passed"] and found.get(row["backend"], "passed") == "passed"
        found[row["backend"]] = "passed" if passed else "FAILED"
    return found if fresh else dict.fromkeys(found, "stale")


def _gate_cell(backend: str, gate_of: dict[str, str]) -> str:
    if backend == REFERENCE:
        return "reference"
    if backend == NOT_ADAPTED:
        return "– (not adapted)"
    return gate_of.get(backend, "not verified")


def _fastest_gated(bench: dict[str, Any], gate_of: dict[str, str]) -> list[str]:
    """Per batch size, the fastest row whose backend passed its gate, with its speed-ups."""
    lines = []
    for batch in dict.fromkeys(r["batch_size"] for r in bench["rows"]):
        passed = [r for r in bench["rows"] if r["batch_size"] == batch and gate_of.get(r["backend"]) == "passed"]
        if passed:
            best = min(passed, key=lambda r: r["p50_ms"])
            over = ", ".join(f"{x} over {name}" for x, name in zip(_speedups(bench, best), SPEEDUP_OVER, strict=True))
            unstable = " (an unstable row)" if best["unstable"] else ""
            lines.append(
                f"- fastest artifact that passed its gate at batch {batch}: {best['backend']} "
                f"({best['precision']}), p50 {best['p50_ms']:.3f} ms{unstable}; {over}"
            )
    return lines


def _roofline_cells(row: dict[str, Any]) -> list[str]:
    """Achieved GFLOP/s and the share of its precision's matmul peak ("–" where bench measured none)."""
    rate, share = row.get("gflop_per_s"), row.get("of_peak")
    return ["–" if rate is None else f"{rate:.1f}", "–" if share is None else f"{share:.0%}"]


def _roofline_note(bench: dict[str, Any]) -> list[str]:
    roofline = bench.get("roofline")
    if not roofline:
        return []
    by = roofline.get("peak_by", {})  # which matmul set each peak (benches before it was recorded: none)
    peaks = ", ".join(
        f"{p} {v:,.1f}" + (f" by {by[p].removeprefix('matmul ')}" if p in by else "")
        for p, v in roofline["peak_gflop_per_s"].items()
    )
    return [
        f"Roofline: {roofline['gflop_per_image']:.3f} GFLOP per image (a multiply-add counts 2, attention included); "
        f"% of peak is the row's GFLOP/s over the best square matmul of its precision measured by the same bench "
        f"at the same threads (GFLOP/s: {peaks}); over 100 % means a runtime's own kernels beat every matmul "
        f"measured for the peak."
    ]


def _export_line(manifest: dict[str, Any], cfg: RunConfig) -> str:
    """The formats, precision and opset the export stage ran with (a `vitfold export --format ...` overrides
    the config's), as its manifest entry recorded them; the config's before any export."""
    ran = manifest["stages"].get("export", {}).get("params") or asdict(cfg.export)
    return f"- export: {', '.join(ran['formats'])} ({ran['precision']}, opset {ran['opset']})"


def _drift_note(bench: dict[str, Any]) -> str:
    """'; the machine drifted by ...' per batch size where bench measured a drift (from three backends)."""
    drifts = {b: d["rel_iqr"] for b, d in (bench.get("machine_drift") or {}).items() if d is not None}
    if not drifts:
        return ""
    found = ", ".join(f"b{b} {v:.1%}" for b, v in drifts.items())
    return f"; the machine's own speed drifted across rounds by (IQR / median) {found}, every row alike"


def _latency(bench: dict[str, Any], gate_of: dict[str, str]) -> list[str]:
    """The bench rows as a table (with each backend's gate from `gate_of`, see `gates`), its notes, and the
    fastest artifact that passed its gate per batch size."""
    if any("unstable" not in r for r in bench["rows"]):
        return ["bench/bench.json predates interleaved rounds and stability flags: rerun `vitfold bench`."]
    rows = [
        [
            r["backend"],
            r["provider"],
            r["precision"],
            r["batch_size"],
            f"{r['p50_ms']:.3f}",
            f"{r['rel_iqr']:.1%}" + (f" ({r['own_rel_iqr']:.1%})" if "own_rel_iqr" in r else ""),
            *("–" if r[k] is None else f"{r[k]:.3f}" for k in ("p90_ms", "p99_ms")),
            f"{r['throughput_ips']:.1f}",
            f"{r['iterations']} / {r['rounds']}",
            "**unstable**" if r["unstable"] else "stable",
            _gate_cell(r["backend"], gate_of),
            *_speedups(bench, r),
            *_roofline_cells(r),
        ]
        for r in bench["rows"]
    ]
    found = bench["machine"]
    compiled = ", ".join(f"{name} for {isa or '?'}" for name, isa in found.get("aoti_compiled_isa", {}).items())
    lines = [
        f"{found.get('gpu') or found['cpu']} ({' '.join(found.get('cpu_isa', [])) or 'ISA unknown'}), "
        f"{bench['threads']} threads on {bench['device']}; calls in rounds that alternate the backends, "
        f"a row unstable when its rounds spread (IQR / median; in brackets: its own, the machine's drift shared "
        f"by all backends of a round divided out) above {bench['unstable_above']:.0%}"
        + _drift_note(bench)
        + (f"; AOTInductor compiled {compiled} (inductor here: {found['inductor_vec_isa']})" if compiled else "")
        + ("" if "spin" not in bench else f"; ONNX Runtime's idle threads {'spin' if bench['spin'] else 'do not spin'}")
        + ".",
        "",
        *_table(
            ["backend", "provider", "precision", "batch", "p50 ms", "rounds IQR", "p90 ms", "p99 ms", "img/s"]
            + ["calls / rounds", "stability", "gate"]
            + [f"× {name}" for name in SPEEDUP_OVER]
            + ["GFLOP/s", "% of peak"],
            rows,
            ["---"] * 3 + ["--:"] * 7 + ["---"] * 2 + ["--:"] * 4,
        ),
        "",
        "p99 only from 100 calls or more (– below). gate: that backend's verify rows (all passed, or FAILED; "
        "stale when the artifacts changed since verify). × columns: that backend's p50 over the row's (the "
        "row's speed-up), same batch size, same interleaved run.",
        *_roofline_note(bench),
        *_fastest_gated(bench, gate_of),
    ]
    lines += [f"- {ratio_line(key, ratio)}" for key, ratio in bench.get("ratios", {}).items()]
    lines += [f"- {name} not measured: {reason}" for name, reason in bench.get("skipped", {}).items()]
    if bench.get("chart", "latency.png") is None:
        return lines + ["", f"(No latency chart: matplotlib is not installed; {CHART_EXTRA}.)"]
    return lines + ["", "![latency per backend](bench/latency.png)"]


def _sources(rd: RunDir) -> list[Path]:
    """The stage results the report is built from: compare.json, verify.json, bench.json."""
    return [rd.compare_summary, rd.verify_dir / "verify.json", rd.bench_dir / "bench.json"]


def _load(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _verdict(rd: RunDir, verify: dict[str, Any] | None) -> str:
    """FAILED, or PASSED only while verify's recorded inputs are still the run's artifacts and every artifact
    the export recorded has passed rows (else what passed, and which artifacts were not verified)."""
    entry = read_manifest(rd)["stages"].get("verify")
    if verify is None or entry is None:
        return "no verify result"
    if not verify["passed"]:
        return "FAILED"
    stale = staleness(rd, "verify", VERIFY.inputs(rd, rd.config.verify), entry.get("params") or {})
    if stale is not None:
        return f"OUT OF DATE ({stale} since verify passed): run vitfold verify"
    loosened = "; ".join(f"{p}: {describe_bars(t)}" for p, t in verify["loosened"].items())
    loosened = f" with tolerances loosened beyond the defaults ({loosened})" if loosened else ""
    checked = {r["backend"] for r in verify["results"] if r["kind"] == "export"}
    unchecked = [path.name for name, path in recorded_artifacts(rd).items() if name not in checked]
    if unchecked:
        passed = ", ".join(sorted(checked)) or "the fold alone"
        return f"PASSED for {passed}{loosened}; {', '.join(unchecked)} not verified"
    return "PASSED" + loosened


def _run(rd: RunDir, cfg: RunConfig, ctx: Context) -> StageResult:
    """Write RUN/REPORT.md from the stages' outputs (sections for missing stages say so)."""
    manifest = read_manifest(rd)
    compare, verify, bench = (_load(p) for p in _sources(rd))
    verdict = _verdict(rd, verify)
    lines = [
        f"# vitfold run report: {cfg.backbone} + {cfg.method} on {cfg.data}",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {_machine()}.",
        f"Verification: **{verdict}**.",
        "",
        "## Configuration",
        "",
        f"- backbone `{cfg.backbone}` {cfg.backbone_kwargs or ''}; weights: "
        + (f"`{cfg.checkpoint}`" if cfg.checkpoint else "hub" if cfg.pretrained else "random init"),
        f"- pre-training: {cfg.pretrain['data']} ({(cfg.pretrain.get('train') or {}).get('epochs', '?')} epochs, full)"
        if cfg.pretrain
        else "- pre-training: none",
        f"- data `{cfg.data}`; method `{cfg.method}` {cfg.method_options or ''}; seed {cfg.seed}",
        f"- training: {cfg.train.total_epochs} epochs ({cfg.train.cooldown_epochs} of them cool-down), "
        f"batch {cfg.train.batch_size}, lr {cfg.train.lr} ({cfg.train.schedule}), "
        f"weight decay {cfg.train.weight_decay}, warm-up {cfg.train.warmup_epochs} epochs, "
        f"drop-path {cfg.train.drop_path} ({cfg.train.drop_path_mode}); precision {cfg.train.precision}; "
        f"folded epoch: {cfg.train.select}",
        *(
            [
                f"- augmentation: mixup {cfg.train.mixup_alpha}, cutmix {cfg.train.cutmix_alpha}, "
                f"label smoothing {cfg.train.label_smoothing}"
            ]
            if cfg.train.mixup_alpha or cfg.train.cutmix_alpha
            else []
        ),
        *(
            [
                f"- folded weights: the EMA of the weights (decay {cfg.train.ema_decay}), not the last step's: "
                "the EMA is what was evaluated and what the fold, export and verify use"
            ]
            if cfg.train.ema_decay is not None
            else []
        ),
        _export_line(manifest, cfg),
        "",
        "## Stages",
        "",
        *_table(
            ["stage", "status", "seconds", "finished"],
            [
                [name, e.get("status", "?"), e.get("seconds", ""), e.get("finished", "")]
                for name, e in manifest["stages"].items()
                if name != "report"
            ],
            ["---", "---", "--:", "---"],
        ),
        "",
        "## Accuracy on the target task",
        "",
        *(_accuracy(compare) if compare else ["No comparison ran (`compare:` in the config)."]),
        "",
        "## Equivalence: the fold against the unmerged model, every artifact against the folded model",
        "",
        *(_equivalence(verify) if verify else ["verify has not run."]),
        "",
        "## Latency",
        "",
        *(
            _latency(bench, gates(verify, fresh=not verdict.startswith("OUT OF DATE")))
            if bench
            else ["bench has not run."]
        ),
        "",
        "## Artifacts",
        "",
        *[
            f"- `{path}` sha256 `{digest[:16]}…`"
            for name, e in manifest["stages"].items()
            if name in ("fold", "export")
            for path, digest in e.get("outputs", {}).items()
        ],
        "",
    ]
    out = atomic_write_text(rd.report, "\n".join(lines))
    ctx.log(f"report: {out}")
    return StageResult([out], value=out)


REPORT = Stage(
    "report", section=None, inputs=lambda rd, s: [rd.config_file, *_sources(rd)], run=_run, params=lambda cfg: {}
)
