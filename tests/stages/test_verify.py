"""verify: statistics checked against numbers computed here, a faithful run passes, a planted ONNX fault
fails and is localised to its block, and a wrong fold is a fold error (its faithful exports still pass)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vitfold.export.comparison import first_diverging_block, logit_stats
from vitfold.pipeline.atomic import atomic_write_json
from vitfold.pipeline.stages import RunDir, run_stage
from vitfold.pipeline.stages.manifest import read_manifest
from vitfold.pipeline.stages.rundir import sha256

from helpers import QUIET, copy_run, vitfold_cli


def test_logit_stats_against_hand_computed_values():
    r = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 4.0]])
    y = r.clone()
    y[1, 0] -= 2.0  # row 1: argmax moves from 0 to 2
    y[3, 2] += 0.04
    stats = logit_stats(y, r)
    diff = np.abs(y.numpy() - r.numpy())
    assert stats["max_abs"] == pytest.approx(2.0)
    assert stats["mean_abs"] == pytest.approx(diff.mean())
    assert stats["max_rel"] == pytest.approx(2.0 / 4.0)
    assert stats["top1_agreement"] == pytest.approx(0.75)
    a, b = y[1].double().numpy(), r[1].double().numpy()
    assert stats["cosine_min"] == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    p = np.exp(r.double().numpy()) / np.exp(r.double().numpy()).sum(1, keepdims=True)
    q = np.exp(y.double().numpy()) / np.exp(y.double().numpy()).sum(1, keepdims=True)
    assert stats["kl_mean"] == pytest.approx((p * np.log(p / q)).sum(1).mean())


def test_first_diverging_block():
    assert first_diverging_block([1e-7, 2e-7, 0.3, 0.5], 1e-4)["block"] == 2
    assert first_diverging_block([1e-7, 2e-7], 1e-4)["block"] is None


def test_faithful_run_passes_with_per_backend_per_batch_rows(exported_run, tmp_path):
    run = copy_run(exported_run, tmp_path / "run")
    result = run_stage("verify", run, batch_sizes=[1, 5], samples=6, **QUIET)
    assert result["passed"]
    seen = {(r["backend"], r["batch_size"]) for r in result["results"]}
    assert seen == {(b, n) for b in ("torch-folded", "torchscript", "onnxruntime", "aoti") for n in (1, 5)}
    assert set(result["skipped"]) == {"tensorrt", "openvino"}  # no TensorRT here; no IR exported
    for row in result["results"]:
        assert row["max_rel"] <= 1e-4 and row["top1_agreement"] == 1.0
        assert {"max_abs", "mean_abs", "p99_abs", "cosine_min", "kl_mean"} <= row.keys()
    on_disk = json.loads((run / "verify" / "verify.json").read_text())
    assert on_disk["passed"] and len(on_disk["results"]) == 8
    suite = ET.parse(run / "verify" / "junit.xml").getroot()
    assert suite.get("failures") == "0" and len(suite.findall("testcase")) == 10  # 8 rows + 2 skipped
    assert "| export | onnxruntime |" in (run / "verify" / "verify.md").read_text()
    assert read_manifest(RunDir(run))["stages"]["verify"]["passed"] is True


def _rerecord(run: Path, stage: str, path: Path) -> None:
    """Pretend the stage itself wrote the changed file: update the hash it recorded."""
    manifest = read_manifest(RunDir(run))
    manifest["stages"][stage]["outputs"][str(path.relative_to(run))] = sha256(path)
    atomic_write_json(run / "manifest.json", manifest)


def test_planted_onnx_fault_fails_and_names_its_block(exported_run, tmp_path):
    run = copy_run(exported_run, tmp_path / "run")
    path = run / "export" / "model.onnx"
    model = onnx.load(str(path))
    bias = next(t for t in model.graph.initializer if t.name == "blocks.1.mlp.fc1.bias")
    values = onnx.numpy_helper.to_array(bias).copy()
    values[7] += 5.0  # one weight of block 1
    bias.CopyFrom(onnx.numpy_helper.from_array(values, bias.name))
    onnx.save(model, str(path))
    _rerecord(run, "export", path)
    result = vitfold_cli("verify", str(run), "--backends", "onnxruntime", "--batch-sizes", "1,4", "--samples", "4")
    assert result.returncode == 1, result.stderr
    assert "onnxruntime: first divergence at blocks.1" in result.stderr
    verdict = json.loads((run / "verify" / "verify.json").read_text())
    assert verdict["localisation"]["onnxruntime"]["block"] == 1
    assert all(r["passed"] for r in verdict["results"] if r["kind"] == "fold")
    junit = ET.parse(run / "verify" / "junit.xml").getroot()
    assert int(junit.get("failures")) == 2 and "blocks.1" in junit.find("testcase/failure").get("message")


def test_wrong_fold_is_a_fold_error_not_an_export_error(exported_run, tmp_path):
    run = copy_run(exported_run, tmp_path / "run", without=("triton", "export"))
    folded = run / "fold" / "model.safetensors"
    with safe_open(folded, "pt") as f:
        meta = f.metadata()
    state = load_file(folded)
    shift = load_file(run / "train" / "adapter.safetensors")["blocks.0.mlp.fc2.f"]
    state["blocks.0.mlp.fc2.bias"] -= shift  # a fold that forgot block 0's fc2 shift
    save_file(state, folded, metadata=meta)
    _rerecord(run, "fold", folded)
    run_stage("export", run, formats=["onnx", "torchscript"], triton=None, **QUIET)
    result = run_stage("verify", run, batch_sizes=[2], samples=4, **QUIET)
    assert not result["passed"]
    by_kind = {r["backend"]: r["passed"] for r in result["results"]}
    assert by_kind == {"torch-folded": False, "torchscript": True, "onnxruntime": True}
    assert result["localisation"]["torch-folded"]["block"] == 0
    assert float(shift.abs().max()) > 0  # the shift was trained away from zero, so the test can fail


def test_verify_cli_input_errors_exit_2(exported_run, tmp_path):
    for args, message in [
        (["--backends", "tvm"], "unknown backend 'tvm'"),
        (["--backends", "tensorrt"], "backend tensorrt"),
        (["--batch-sizes", "0"], "--batch-sizes"),
    ]:
        result = vitfold_cli("verify", str(exported_run), *args)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr.strip().splitlines()[-1]
    assert vitfold_cli("verify", str(tmp_path / "none")).returncode == 2
