"""A fault planted in each exported artifact fails that backend's own verify row with exit 1, and the
localisation names the block where the runtime can show block outputs; a failed verify makes `vitfold
run` exit 1 too."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from vitfold.export import FILES, export
from vitfold.pipeline.atomic import atomic_write_json
from vitfold.pipeline.stages import RunDir
from vitfold.pipeline.stages.backends import folded_model
from vitfold.pipeline.stages.manifest import read_manifest
from vitfold.pipeline.stages.rundir import sha256
from vitfold.pipeline.stages.trust import remember

from helpers import copy_run, vitfold_cli

# backend -> (export format, precision, whether the runtime can show block outputs)
BACKENDS = {
    "torchscript": ("torchscript", "fp32", False),
    "aoti": ("aoti", "fp32", False),
    "onnxruntime": ("onnx", "fp32", True),
    "onnxruntime-fp16": ("onnx-fp16", "fp16", True),
}


def _plant(run, fmt: str, precision: str) -> None:
    """Replace the run's artifact with one exported from the folded model with one weight of block 1
    changed, and record it as the export stage would (manifest sha256, and trusted on this machine)."""
    rd = RunDir(run)
    model = folded_model(rd)
    with torch.no_grad():
        model.blocks[1].mlp.fc1.bias[7] += 5.0
    files = export(
        model,
        run / "planted",
        formats=("onnx" if fmt.startswith("onnx") else fmt,),
        input_size=(3, *rd.image_size()),
        precision=precision,
    )
    target = rd.artifact(fmt)
    shutil.copy(files[fmt], target)
    shutil.rmtree(run / "planted")
    manifest = read_manifest(rd)
    manifest["stages"]["export"]["outputs"][rd.key(target)] = sha256(target)
    atomic_write_json(rd.manifest_file, manifest)
    remember(sha256(target))


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_a_fault_in_one_artifact_fails_its_own_row(exported_run, tmp_path, backend):
    fmt, precision, shows_blocks = BACKENDS[backend]
    run = copy_run(exported_run, tmp_path / "run")
    if fmt == "onnx-fp16":  # the shared run has no fp16 ONNX: export one, then plant the fault in it
        assert vitfold_cli("export", str(run), "--format", "onnx", "--precision", "fp16").returncode == 0
    _plant(run, fmt, precision)
    result = vitfold_cli("verify", str(run), "--backends", backend, "--batch-sizes", "1,3", "--samples", "3")
    assert result.returncode == 1, result.stderr
    verdict = json.loads((run / "verify" / "verify.json").read_text())
    rows = {(r["backend"], r["batch_size"]): r["passed"] for r in verdict["results"]}
    assert rows == {("torch-folded", 1): True, ("torch-folded", 3): True, (backend, 1): False, (backend, 3): False}
    where = verdict["localisation"][backend]
    if shows_blocks:
        assert where["block"] == 1 and f"{backend}: first divergence at blocks.1" in result.stderr
    else:
        assert where["block"] is None and "cannot expose block outputs" in where["where"]


def test_vitfold_run_exits_1_when_verify_fails(exported_run, tmp_path):
    run = copy_run(exported_run, tmp_path / "run")
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["verify"] = {"batch_sizes": [2], "samples": 2, "tolerances": {"max_rel": 0.0}}  # nothing is bit-exact
    config["export"] = {**config["export"], "formats": ["onnx"], "triton": None}
    config["bench"] = {"batch_sizes": [1], "backends": ["onnxruntime"], "min_iters": 1, "min_seconds": 0.0}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    result = vitfold_cli("run", "--config", str(tmp_path / "c.yaml"), "--out", str(run))
    assert result.returncode == 1, result.stderr
    assert "verify FAILED" in result.stderr and "Verification: **FAILED**" in (run / "REPORT.md").read_text()
    assert FILES["onnx"] in {p.name for p in (run / "export").iterdir()}
