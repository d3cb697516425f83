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


def _verify_cli(artifact: Path, run: Path, out: Path, *extra: str, env: dict[str, str] | None = None):
    return vitfold_cli(
        "verify", "--artifact", str(artifact), "--reference", str(run), "--output", str(out),
        "--batch-sizes", "1,3", "--samples", "3", "--eval-images", "16", *extra, env=env,
    )  # fmt: skip


def _faulty_folded(run: Path) -> torch.nn.Module:
    from vitfold.pipeline.stages import RunDir
    from vitfold.pipeline.stages.backends import folded_model

    model = folded_model(RunDir(run))
    with torch.no_grad():
        model.blocks[1].mlp.fc1.bias[7] += 5.0
    return model


def test_onnx_files_with_any_names_pass_and_a_perturbed_one_names_its_block(exported_run, tmp_path):
    """timm's ONNX export helper (TorchScript-based exporter, input0/output0, dynamic batch) and
    torch.onnx.export with its default names (dynamo, a fixed batch of 2) pass against the run; a perturbed
    timm export exits 1 naming the block (read from the node names of that exporter)."""
    from timm.utils.onnx import onnx_export

    from vitfold.pipeline.stages import RunDir
    from vitfold.pipeline.stages.backends import folded_model

    model = folded_model(RunDir(exported_run))
    size = (3, *model.patch_embed.img_size)
    onnx_export(model, str(tmp_path / "timm.onnx"), input_size=size, batch_size=2)
    torch.onnx.export(model, (torch.randn(2, *size),), str(tmp_path / "plain.onnx"), dynamo=True)
    graphs = {f: onnx.load(str(tmp_path / f"{f}.onnx")).graph for f in ("timm", "plain")}
    names = {f: ([i.name for i in g.input], [o.name for o in g.output]) for f, g in graphs.items()}
    assert names["timm"] == (["input0"], ["output0"]) and names["plain"] != (["input"], ["logits"]), names
    for name in ("timm", "plain"):
        result = _verify_cli(tmp_path / f"{name}.onnx", exported_run, tmp_path / f"out-{name}")
        assert result.returncode == 0, (name, result.stderr)
    onnx_export(_faulty_folded(exported_run), str(tmp_path / "faulty.onnx"), input_size=size, batch_size=2)
    result = _verify_cli(tmp_path / "faulty.onnx", exported_run, tmp_path / "out-faulty")
    assert result.returncode == 1, result.stderr
    assert "onnxruntime: first divergence at blocks.1" in result.stderr


def test_an_onnx_of_several_inputs_needs_input_name_and_lists_them(exported_run, tmp_path):
    model = onnx.load(str(exported_run / "export" / "model.onnx"))
    extra = onnx.helper.make_tensor_value_info("unused", onnx.TensorProto.FLOAT, [1])
    model.graph.input.append(extra)
    onnx.save(model, str(tmp_path / "two.onnx"))
    result = _verify_cli(tmp_path / "two.onnx", exported_run, tmp_path / "out")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "--input-name" in result.stderr and "input, unused" in result.stderr
    assert not (tmp_path / "out" / "verify.json").exists()


def test_reduced_precision_onnx_renamed_is_judged_at_its_precision(exported_run, tmp_path):
    """model.fp16.onnx and model.int8.onnx renamed to neutral names: the precision is read from the graph, so
    the rows carry fp16 (fp16 bars) and int8 (the split bars), not fp32."""
    from vitfold.export import export
    from vitfold.export.comparison import DEFAULT_TOLERANCES
    from vitfold.pipeline.stages import RunDir
    from vitfold.pipeline.stages.backends import folded_model

    model = folded_model(RunDir(exported_run))
    size = (3, *model.patch_embed.img_size)
    fp16 = export(model, tmp_path / "fp16", formats=("onnx",), input_size=size, precision="fp16")["onnx-fp16"]
    int8 = export(model, tmp_path / "int8", formats=("onnx",), input_size=size, precision="int8", int8_mode="dynamic")
    for source, precision in ((fp16, "fp16"), (int8["onnx-int8"], "int8")):
        neutral = tmp_path / f"candidate-{precision}.onnx"
        source.rename(neutral)
        if source.with_name(source.name + ".data").exists():
            source.with_name(source.name + ".data").rename(neutral.with_name(source.name + ".data"))
        result = verify_artifact(neutral, str(exported_run), out_dir=tmp_path / f"out-{precision}", **QUICK)
        assert {r["precision"] for r in result["results"]} == {precision}
        assert result["tolerances"] == {precision: DEFAULT_TOLERANCES[precision].to_dict()}
        assert result["artifact"]["precision_from"] == "its graph"
    assert {r["precision"] for r in verify_artifact(
        neutral, str(exported_run), out_dir=tmp_path / "forced", precision="fp16", **QUICK
    )["results"]} == {"fp16"}  # fmt: skip


def test_an_artifact_against_a_run_is_compared_with_the_folded_model(exported_run, tmp_path):
    """Every row's max_abs is |artifact − folded| computed here with onnxruntime and timm on the same inputs;
    the end-to-end statistics are against the unmerged model."""
    import onnxruntime as ort

    from vitfold.pipeline.stages import RunDir
    from vitfold.pipeline.stages.backends import folded_model, unmerged_model
    from vitfold.pipeline.stages.verify import run_inputs

    rd = RunDir(exported_run)
    artifact = exported_run / "export" / "model.onnx"
    result = verify_artifact(artifact, str(exported_run), out_dir=tmp_path / "out", **QUICK)
    settings = rd.config.verify.__class__(**{**rd.config.verify.__dict__, "samples": 3, "eval_images": 24})
    sample = run_inputs(rd, unmerged_model(rd), settings).sample
    session = ort.InferenceSession(str(artifact), providers=["CPUExecutionProvider"])
    by_ort = torch.from_numpy(session.run(None, {"input": sample.numpy()})[0]).double()
    with torch.no_grad():
        folded, unmerged = folded_model(rd)(sample).double(), unmerged_model(rd)(sample).double()
    for row in result["results"]:
        assert row["max_abs"] == pytest.approx(float((by_ort - folded).abs().max()), rel=1e-3, abs=1e-7)
        assert row["end_to_end"]["max_abs"] == pytest.approx(float((by_ort - unmerged).abs().max()), rel=1e-3, abs=1e-7)


def _empty_trust_store(tmp_path: Path) -> dict[str, str]:
    """VITFOLD_CACHE: this session's cache (its pre-trained backbones) without its trust store."""
    import os
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(os.environ["VITFOLD_CACHE"], cache, ignore=shutil.ignore_patterns("trusted"))
    return {"VITFOLD_CACHE": str(cache)}


def test_a_pt2_copied_out_of_a_run_is_refused_until_trusted(exported_run, tmp_path):
    import shutil

    artifact = shutil.copy(exported_run / "export" / "model.pt2", tmp_path / "model.pt2")
    env = _empty_trust_store(tmp_path)
    refused = _verify_cli(artifact, exported_run, tmp_path / "out", env=env)
    assert refused.returncode == 2 and "runs native code" in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    (Path(env["VITFOLD_CACHE"]) / "trusted").mkdir()
    (Path(env["VITFOLD_CACHE"]) / "trusted" / ("0" * 64)).touch()  # a marker for another digest
    again = _verify_cli(artifact, exported_run, tmp_path / "out", env=env)
    assert again.returncode == 2 and "runs native code" in again.stderr, again.stderr
    trusted = _verify_cli(artifact, exported_run, tmp_path / "out", "--trust", env=env)
    assert trusted.returncode == 0, trusted.stderr


def test_a_file_swapped_after_hashing_is_never_loaded(exported_run, tmp_path, monkeypatch):
    """The loader is patched to replace the file at the user's path just before it loads: the runtime gets the
    private copy that was hashed, so the swapped bytes (garbage, which could not load) never run."""
    import shutil

    from vitfold.export import runners
    from vitfold.pipeline.stages.trust import remember

    artifact = Path(shutil.copy(exported_run / "export" / "model.pt", tmp_path / "model.pt"))
    remember(runners.file_sha256(artifact))
    loaded: list[Path] = []
    real_init = runners.TorchScriptRunner.__init__

    def swap_then_load(self, path, device):
        artifact.write_bytes(b"not the file that was hashed")
        loaded.append(Path(path))
        real_init(self, path, device)

    monkeypatch.setattr(runners.TorchScriptRunner, "__init__", swap_then_load)
    result = verify_artifact(artifact, str(exported_run), out_dir=tmp_path / "out", **QUICK)
    assert result["passed"] and loaded and all(p != artifact and not p.exists() for p in loaded)


@pytest.mark.parametrize("suffix", [".onnx", ".pt2"])
def test_an_empty_or_unloadable_artifact_is_one_line_exit_2(exported_run, tmp_path, suffix):
    empty = tmp_path / f"empty{suffix}"
    empty.touch()
    garbage = tmp_path / f"garbage{suffix}"
    garbage.write_bytes(b"PK\x03\x04 not a package")
    for artifact in (empty, garbage):
        result = _verify_cli(artifact, exported_run, tmp_path / "out", "--trust", "--precision", "fp32")
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr
        assert not (tmp_path / "out" / "verify.json").exists()
