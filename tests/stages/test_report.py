"""The report stage: REPORT.md states what the stages ran with (their recorded settings, not the config's
defaults), and the bench's machine drift where bench measured one."""

from __future__ import annotations

import json

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
