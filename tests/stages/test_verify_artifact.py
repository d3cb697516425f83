"""verify --artifact: any artifact file against the model it claims to be (a run, a folded file, a timm name
with a checkpoint), and the Polygraphy-style elementwise bar |a − b| ≤ atol + rtol·|b|."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from vitfold.cli import main
from vitfold.errors import VitfoldError
from vitfold.export.comparison import Tolerance, compare, tolerances_for
from vitfold.pipeline.stages import run_stage
from vitfold.pipeline.stages.verify_artifact import verify_artifact

from helpers import QUIET, TINY_VITS, copy_run, vitfold_cli

QUICK = {"batch_sizes": [1, 3], "samples": 3, "eval_images": 24, "log": QUIET["log"]}


def _hand_allclose(y: np.ndarray, r: np.ndarray, atol: float, rtol: float) -> tuple[float, int]:
    """(least passing atol at rtol, elements outside atol + rtol·|r|), element by element in Python."""
    needed, mismatches = -np.inf, 0
    for a, b in zip(y.ravel().tolist(), r.ravel().tolist(), strict=True):
        needed = max(needed, abs(a - b) - rtol * abs(b))
        mismatches += not abs(a - b) <= atol + rtol * abs(b)
    return needed, mismatches


def test_elementwise_bar_against_a_hand_computation():
    r = torch.tensor([[10.0, -2.0, 0.5], [0.0, 4.0, -8.0]], dtype=torch.float64)
    y = r + torch.tensor([[0.05, -0.01, 0.0], [0.02, 0.0, 0.1]], dtype=torch.float64)
    # (atol, rtol) -> elements outside atol + rtol·|r|, counted by hand from the table above
    for atol, rtol, outside in [(0.0, 0.01, 2), (0.03, 0.01, 0), (0.011, 0.0, 3), (0.11, 0.0, 0), (0.0, 1.0, 1)]:
        result = compare(r, y, Tolerance(atol=atol, rtol=rtol))
        needed, mismatches = _hand_allclose(y.numpy(), r.numpy(), atol, rtol)
        assert mismatches == outside
        assert result.stats["atol_needed"] == pytest.approx(needed)
        assert result.stats["elementwise_mismatches"] == outside
        assert bool(result) is (outside == 0), (atol, rtol)
    # at rtol 0.01 the worst elements need atol 0.02: (1, 0) with |r| = 0, and (1, 2): 0.1 − 0.01·8
    assert compare(r, y, Tolerance(atol=0.0, rtol=0.01)).stats["atol_needed"] == pytest.approx(0.02)
    assert not compare(r, y, Tolerance(atol=0.0199, rtol=0.01))
    assert compare(r, y, Tolerance(atol=0.0201, rtol=0.01))


def test_elementwise_bar_fails_closed():
    tol = Tolerance(atol=1e-3, rtol=1e-3)
    stats = {"atol_needed": 0.0, "rtol": 1e-3}
    assert tol.check(stats)
    assert not tol.check({"rtol": 1e-3})  # no atol_needed measured
    assert not tol.check({**stats, "rtol": 0.1})  # measured at another rtol
    r = torch.ones(2, 3)
    assert not compare(r, r * float("nan"), tol)  # NaN is outside every bar
    assert compare(r, r * float("nan"), tol).stats["elementwise_mismatches"] == 6


def test_atol_rtol_overrides_reach_the_elementwise_precisions_and_count_as_loosened():
    tolerances = tolerances_for({"atol": 1e-5, "rtol": 1e-4})
    assert [p for p, t in tolerances.items() if t.elementwise == (1e-5, 1e-4)] == ["fp32", "fp16", "bf16"]
    assert tolerances["int8"].elementwise is None  # int8 is judged on the split, not elementwise
    tight = tolerances_for({"fp32": {"atol": 1e-6}})["fp32"]
    assert tolerances_for({"fp32": {"atol": 1e-3}})["fp32"].looser_than(tight) == {"atol": 1e-3}
    with pytest.raises(VitfoldError, match="tolerances: unknown key 'atoll'"):
        tolerances_for({"atoll": 1.0})


def test_a_runs_onnx_passes_against_the_run_and_nothing_is_written_into_it(exported_run, tmp_path):
    before = sorted((p.relative_to(exported_run), p.stat().st_mtime_ns) for p in exported_run.rglob("*"))
    out = tmp_path / "out"
    artifact = exported_run / "export" / "model.onnx"
    result = verify_artifact(artifact, str(exported_run), out_dir=out, tolerances={"atol": 1e-5, "rtol": 1e-4}, **QUICK)
    assert result["passed"] and result["artifact"]["runtime"] == "onnxruntime"
    assert {(r["kind"], r["compared_to"], r["batch_size"]) for r in result["results"]} == {
        ("artifact", "torch-folded", 1),
        ("artifact", "torch-folded", 3),
    }
    for row in result["results"]:
        assert row["atol_needed"] <= 1e-5 and row["elementwise_mismatches"] == 0 and "end_to_end" in row
        assert row["split_images"] == 24
    assert json.loads((out / "verify.json").read_text())["passed"]
    assert ET.parse(out / "junit.xml").getroot().get("failures") == "0"
    assert sorted((p.relative_to(exported_run), p.stat().st_mtime_ns) for p in exported_run.rglob("*")) == before
    with pytest.raises(VitfoldError, match="inside the reference run"):
        verify_artifact(artifact, str(exported_run), out_dir=exported_run / "verify", **QUICK)


def _perturbed_copy(run: Path, folder: Path) -> Path:
    """A copy of the run's ONNX (outside the run) with one weight of block 1 changed."""
    model = onnx.load(str(run / "export" / "model.onnx"))
    bias = next(t for t in model.graph.initializer if t.name == "blocks.1.attn.proj.bias")
    values = onnx.numpy_helper.to_array(bias).copy()
    values[3] += 2.0
    bias.CopyFrom(onnx.numpy_helper.from_array(values, bias.name))
    onnx.save(model, str(folder / "optimized.onnx"))
    return folder / "optimized.onnx"


def test_a_perturbed_onnx_copy_exits_1_and_names_its_block(exported_run, tmp_path):
    out = tmp_path / "out"
    result = vitfold_cli(
        "verify", "--artifact", str(_perturbed_copy(exported_run, tmp_path)), "--reference", str(exported_run),
        "--output", str(out), "--batch-sizes", "2", "--samples", "3", "--eval-images", "16",
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "onnxruntime: first divergence at blocks.1" in result.stderr
    verdict = json.loads((out / "verify.json").read_text())
    assert verdict["localisation"]["onnxruntime"]["block"] == 1 and not verdict["passed"]
    assert "blocks.1" in ET.parse(out / "junit.xml").getroot().find("testcase/failure").get("message")


def test_references_without_a_run_use_random_inputs(exported_run, tmp_path):
    """The run's folded file (its metadata names the backbone), a timm name with that file as checkpoint, and
    a timm model folder saved from it."""
    import timm

    from vitfold.pipeline.backbones import load_folded

    artifact, folded = exported_run / "export" / "model.onnx", exported_run / "fold" / "model.safetensors"
    by_file = verify_artifact(artifact, str(folded), out_dir=tmp_path / "a", **QUICK)
    name, kwargs = TINY_VITS["run"]
    by_name = verify_artifact(
        artifact, name, checkpoint=str(folded), num_classes=5, backbone_kwargs=kwargs, out_dir=tmp_path / "b", **QUICK
    )
    timm.models.save_for_hf(load_folded(folded, name, 5, kwargs), tmp_path / "hf", model_args=kwargs)
    by_folder = verify_artifact(artifact, f"local-dir:{tmp_path / 'hf'}", out_dir=tmp_path / "c", **QUICK)
    for result in (by_file, by_name, by_folder):
        assert result["passed"] and result["inputs"] == {"random": 3, "batch_sizes": [1, 3], "split_images": 0}
        assert all("split_top1_agreement" not in r and "end_to_end" not in r for r in result["results"])
    assert "seeded random images" in (tmp_path / "a" / "verify.md").read_text()
    perturbed = verify_artifact(_perturbed_copy(exported_run, tmp_path), str(folded), out_dir=tmp_path / "d", **QUICK)
    assert not perturbed["passed"] and perturbed["localisation"]["onnxruntime"]["block"] == 1
    with pytest.raises(VitfoldError, match="needs --checkpoint"):
        verify_artifact(artifact, name, out_dir=tmp_path / "e", **QUICK)


def test_a_changed_artifact_inside_its_run_is_refused_pointing_to_artifact(exported_run, tmp_path):
    run = copy_run(exported_run, tmp_path / "run")
    path = run / "export" / "model.onnx"
    model = onnx.load(str(path))
    model.doc_string = "optimized elsewhere"
    onnx.save(model, str(path))
    with pytest.raises(VitfoldError, match=r"refusing a changed file; .*vitfold verify --artifact FILE --reference"):
        run_stage("verify", run, backends=["onnxruntime"], **QUIET)


def test_verify_cli_mode_errors_exit_2(exported_run):
    artifact = str(exported_run / "export" / "model.onnx")
    for args, message in [
        (["--artifact", artifact], "--artifact needs --reference"),
        ([str(exported_run), "--artifact", artifact, "--reference", str(exported_run)], "RUN_DIR does not apply"),
        ([str(exported_run), "--reference", str(exported_run)], "--reference applies only with --artifact"),
        (["--artifact", str(Path(artifact).with_suffix(".xyz")), "--reference", "x"], "not found"),
    ]:
        result = CliRunner().invoke(main, ["verify", *args])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
