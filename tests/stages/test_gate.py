"""The gate fails closed: a lost, unrecorded or unbuilt artifact cannot let verify pass; a bad setting is
one line and exit 2 before anything is written; loosened tolerances are visible everywhere."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from vitfold.cli import main
from vitfold.export.comparison import first_diverging_block
from vitfold.pipeline.atomic import atomic_write_json
from vitfold.pipeline.stages import RunDir, run_stage
from vitfold.pipeline.stages.manifest import read_manifest, staleness
from vitfold.pipeline.stages.verify import VERIFY

from helpers import QUIET, copy_run, vitfold_cli


def _drop_record(run: Path, stage: str, key: str) -> None:
    manifest = read_manifest(RunDir(run))
    del manifest["stages"][stage]["outputs"][key]
    atomic_write_json(run / "manifest.json", manifest)


def test_a_lost_artifact_fails_verify_instead_of_being_skipped(exported_run, tmp_path):
    run = copy_run(exported_run, tmp_path / "run")
    (run / "export" / "model.onnx").unlink()
    (run / "export" / "model.pt2").unlink()
    result = vitfold_cli("verify", str(run), "--samples", "2", "--batch-sizes", "2")
    assert result.returncode == 2, result.stderr
    assert "is missing, though the export stage recorded it" in result.stderr.strip().splitlines()[-1]
    assert not (run / "verify").exists()


def test_an_artifact_the_export_stage_did_not_record_is_never_loaded(exported_run, tmp_path):
    run = copy_run(exported_run, tmp_path / "run")
    _drop_record(run, "export", "export/model.pt2")  # as if someone dropped a .pt2 into the run
    result = vitfold_cli("verify", str(run), "--backends", "aoti", "--samples", "2", "--batch-sizes", "2")
    assert result.returncode == 2, result.stderr
    assert "was not written by this run's export stage" in result.stderr


def test_verify_with_no_artifact_fails_unless_allowed(exported_run, tmp_path):
    run = copy_run(exported_run, tmp_path / "run", without=("triton", "export"))
    manifest = read_manifest(RunDir(run))
    del manifest["stages"]["export"]
    atomic_write_json(run / "manifest.json", manifest)
    refused = vitfold_cli("verify", str(run), "--samples", "2", "--batch-sizes", "2")
    assert refused.returncode == 2 and "no exported artifact to check" in refused.stderr, refused.stderr
    allowed = vitfold_cli("verify", str(run), "--samples", "2", "--batch-sizes", "2", "--allow-no-export")
    assert allowed.returncode == 0, allowed.stderr
    rows = json.loads((run / "verify" / "verify.json").read_text())["results"]
    assert {r["kind"] for r in rows} == {"fold"}


def test_export_removes_formats_it_did_not_build_and_verify_goes_out_of_date(exported_run, tmp_path):
    run = copy_run(exported_run, tmp_path / "run")
    run_stage("verify", run, batch_sizes=[2], samples=2, **QUIET)
    rd = RunDir(run)

    def verify_staleness():
        return staleness(
            rd, "verify", VERIFY.inputs(rd, rd.config.verify), read_manifest(rd)["stages"]["verify"]["params"]
        )

    assert verify_staleness() is None
    run_stage("export", run, formats=["onnx"], triton=None, **QUIET)
    assert not (run / "export" / "model.pt").exists() and not (run / "export" / "model.pt2").exists()
    assert set(read_manifest(rd)["stages"]["export"]["outputs"]) == {"export/model.onnx"}
    why = verify_staleness()
    assert why is not None and "export/model.p" in why.message  # the dropped artifacts were verify's inputs
    run_stage("report", run, **QUIET)
    report = (run / "REPORT.md").read_text()
    assert "Verification: **OUT OF DATE" in report and "Verification: **PASSED" not in report


@pytest.mark.parametrize(
    ("section", "values", "message"),
    [
        ("export", {"formats": ["onxx"]}, "export.formats must be a list of onnx"),
        ("train", {"batch_size": 0}, "train.batch_size must be a positive integer, got 0"),
        ("train", {"epochs": 0}, "train.epochs must be a positive integer, got 0"),
        ("train", {"hflip": "no"}, "train.hflip must be true or false, got 'no'"),
        ("train", {"device": "tpu"}, "train.device must be auto, cpu or cuda, got 'tpu'"),
        ("train", {"lr": float("nan")}, "train.lr must be a positive number"),
        ("verify", {"batch_sizes": [0]}, "verify.batch_sizes must be a list of positive integers"),
        ("verify", {"samples": 0}, "verify.samples must be a positive integer"),
        ("verify", {"tolerances": {"max_rell": 1}}, "verify.tolerances: unknown key 'max_rell'"),
        ("verify", {"tolerances": {"max_rel": float("nan")}}, "verify.tolerances: 'max_rel' must be a finite number"),
        ("verify", {"tolerances": {"fp16": {"atol": -1}}}, "verify.tolerances.fp16: 'atol' must be a finite number"),
        ("bench", {"threads": 0}, "bench.threads must be a positive integer"),
        ("method_options", {"dropout": "x"}, "option 'dropout' must be in [0, 1)"),
    ],
)
def test_bad_settings_are_one_line_exit_2_before_anything_is_written(tmp_path, section, values, message):
    config = {"backbone": "vit_tiny_patch16_224", "method": "efft2", section: values}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(main, ["run", "--config", str(path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.output
    assert not (tmp_path / "run").exists()


def test_a_failed_train_command_leaves_the_run_config_alone(exported_run, tmp_path):
    run = copy_run(exported_run, tmp_path / "run")
    before = (run / "config.yaml").read_text()
    result = CliRunner().invoke(main, ["train", "--out", str(run), "--resume", "--method", "rlrx"])
    assert result.exit_code == 2 and "'rlrx' is not one of 'rlrr'" in result.output
    assert (run / "config.yaml").read_text() == before


def test_a_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("backbone: vit_tiny_patch16_224\ntrain: {epochs: 3\n")
    result = CliRunner().invoke(main, ["run", "--config", str(path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert f"config {path}, line 3 column 1:" in result.output and len(result.output.strip().splitlines()) == 1


def test_loosened_tolerances_are_reported_everywhere(exported_run, tmp_path):
    run = copy_run(exported_run, tmp_path / "run")
    args = ["--max-rel", "10", "--cosine-min", "0", "--top1-min", "0", "--samples", "2", "--batch-sizes", "2"]
    result = vitfold_cli("verify", str(run), *args)
    assert result.returncode == 0, result.stderr
    assert (
        "WARNING: fp32 tolerances loosened beyond the defaults: max_rel 10, cosine_min 0, top1_min 0" in result.stderr
    )
    verdict = json.loads((run / "verify" / "verify.json").read_text())
    assert verdict["loosened"]["fp32"] == {"max_rel": 10.0, "cosine_min": 0.0, "top1_min": 0.0}
    assert "tolerances loosened" in (run / "verify" / "verify.md").read_text()
    names = {p.get("name") for p in ET.parse(run / "verify" / "junit.xml").getroot().iter("property")}
    assert {"loosened.fp32.max_rel", "loosened.fp32.top1_min"} <= names
    run_stage("report", run, **QUIET)
    assert "PASSED with tolerances loosened beyond the defaults" in (run / "REPORT.md").read_text()
    strict = vitfold_cli("verify", str(run), "--samples", "2", "--batch-sizes", "2")
    assert "WARNING" not in strict.stderr and json.loads((run / "verify" / "verify.json").read_text())["loosened"] == {}


def test_localisation_treats_nan_as_divergence():
    assert first_diverging_block([1e-7, float("nan"), 0.5], 1e-4)["block"] == 1


def test_settings_of_a_stage_run_alone_are_what_the_manifest_records(exported_run, tmp_path):
    run = copy_run(exported_run, tmp_path / "run")
    run_stage("verify", run, batch_sizes=[3], samples=2, **QUIET)
    params = read_manifest(RunDir(run))["stages"]["verify"]["params"]
    assert params["batch_sizes"] == [3] and params["samples"] == 2
    shutil.rmtree(run / "verify")


def test_bad_backends_and_tolerances_are_refused_before_the_stage_is_marked_running(exported_run, tmp_path):
    """A mistyped backend or an impossible bar is exit 2, one line, and the manifest is not touched (so the
    report does not turn OUT OF DATE and `vitfold run` does not redo verify and bench)."""
    run = copy_run(exported_run, tmp_path / "run")
    before = (run / "manifest.json").read_bytes()
    for args, message in [
        (["verify", str(run), "--backends", "onnxruntim"], "unknown backend 'onnxruntim'"),
        (["bench", str(run), "--backends", "onnxruntime,tourch-folded"], "unknown backend 'tourch-folded'"),
        (["verify", str(run), "--atol", "-1"], "'atol' must be a finite number in [0, inf], got -1.0"),
        (["verify", str(run), "--max-rel", "nan"], "'max_rel' must be a finite number"),
        (["verify", str(run), "--cosine-min", "1.5"], "'cosine_min' must be a finite number in [0, 1]"),
    ]:
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, (args, result.output)
        assert len(result.output.strip().splitlines()) == 1 and message in result.output, result.output
    assert (run / "manifest.json").read_bytes() == before


def test_the_report_names_the_artifacts_verify_did_not_check(exported_run, tmp_path):
    run = copy_run(exported_run, tmp_path / "run")
    run_stage("verify", run, backends=["onnxruntime"], batch_sizes=[2], samples=2, **QUIET)
    run_stage("report", run, **QUIET)
    report = (run / "REPORT.md").read_text()
    assert "Verification: **PASSED for onnxruntime; model.pt, model.pt2 not verified**" in report
    run_stage("verify", run, batch_sizes=[2], samples=2, **QUIET)
    run_stage("report", run, **QUIET)
    assert "Verification: **PASSED**." in (run / "REPORT.md").read_text()
