"""The report stage: REPORT.md states what the stages ran with (their recorded settings, not the config's
defaults), and the bench's machine drift where bench measured one."""

from __future__ import annotations

import json
import re

import yaml

from vitfold.pipeline.stages import run_stage

from helpers import QUIET, copy_run


def _export_line(report: str) -> str:
    return next(line for line in report.splitlines() if line.startswith("- export:"))


def test_the_report_names_the_formats_the_export_ran_with_not_the_configs(exported_run, tmp_path):
    run = copy_run(exported_run, tmp_path / "run")
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["export"]["formats"] != ["onnx"]  # the config asks for more than the export below writes
    run_stage("export", run, formats=["onnx"], opset=17, **QUIET)
    run_stage("report", run, **QUIET)
    assert _export_line((run / "REPORT.md").read_text()) == "- export: onnx (fp32, opset 17)"


def test_the_report_states_the_machine_drift_the_bench_measured(exported_run, tmp_path):
    run = copy_run(exported_run, tmp_path / "run")
    run_stage("bench", run, batch_sizes=[1], min_iters=5, min_seconds=0.05, rounds=3, roofline=False, **QUIET)
    bench = json.loads((run / "bench" / "bench.json").read_text())
    ran = {row["backend"] for row in bench["rows"]}
    assert len(ran) >= 3 and bench["machine_drift"]["1"] is not None  # three backends or more: a drift
    run_stage("report", run, **QUIET)
    drift = bench["machine_drift"]["1"]["rel_iqr"]
    assert (
        f"the machine's own speed drifted across rounds by (IQR / median) b1 {drift:.1%}"
        in (run / "REPORT.md").read_text()
    )


def _row_line(report: str, backend: str, batch: int) -> str:
    return next(x for x in report.splitlines() if x.startswith(f"| {backend} |") and f" | {batch} | " in x)


def test_the_latency_table_gives_each_backends_gate_and_the_fastest_artifact_that_passed(exported_run, tmp_path):
    run = copy_run(exported_run, tmp_path / "run")
    run_stage("verify", run, backends=["onnxruntime", "torchscript"], **QUIET)  # aoti left unverified
    backends = ["torch-unmerged", "torch-folded", "torch-base", "onnxruntime", "torchscript", "aoti"]
    fast = {"min_iters": 5, "min_seconds": 0.05, "rounds": 3, "roofline": False}
    run_stage("bench", run, backends=backends, batch_sizes=[1], **fast, **QUIET)
    bench = json.loads((run / "bench" / "bench.json").read_text())
    p50 = {r["backend"]: r["p50_ms"] for r in bench["rows"]}
    expected = {
        "torch-unmerged": "reference",
        "torch-folded": "passed",
        "torch-base": "– (not adapted)",
        "onnxruntime": "passed",
        "torchscript": "passed",
        "aoti": "not verified",
    }
    verify_json = run / "verify" / "verify.json"
    for failed in (None, min(("torch-folded", "onnxruntime", "torchscript"), key=p50.get)):
        if failed:  # one row of the fastest verified backend fails: FAILED, and it is no longer the fastest
            verify = json.loads(verify_json.read_text())
            rows = [row for row in verify["results"] if row["backend"] == failed]
            assert len(rows) >= 2 and all(row["passed"] for row in rows)
            rows[0]["passed"] = False  # its first row only: a later passing row must not hide it
            verify_json.write_text(json.dumps({**verify, "passed": False}))
            expected[failed] = "FAILED"
        run_stage("report", run, **QUIET)
        report = (run / "REPORT.md").read_text()
        for backend, gate in expected.items():
            assert re.search(rf"\| (stable|\*\*unstable\*\*) \| {re.escape(gate)} \|", _row_line(report, backend, 1))
        best = min((b for b, gate in expected.items() if gate == "passed"), key=p50.get)
        line = f"- fastest artifact that passed its gate at batch 1: {best} (fp32), p50 {p50[best]:.3f} ms"
        assert line in report and f"{p50['torch-unmerged'] / p50[best]:.2f}× over torch-unmerged" in report
