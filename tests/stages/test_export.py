"""The fold and export stages on a trained tiny run, and ONNX of real-size ViT-B with random weights."""

from __future__ import annotations

import collections
import copy
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file, save_file

import vitfold
from vitfold.errors import FoldError, VitfoldError
from vitfold.export.onnx import export_onnx
from vitfold.pipeline.config import load_config
from vitfold.pipeline.models import build_model
from vitfold.pipeline.stages import run_stage

from helpers import QUIET, TINY_RUN, randomize_trainable, vitfold_cli

TINY = TINY_RUN["backbone_kwargs"]
FOLD_FILES = ("model.safetensors", "config.json")  # the weights, and timm's config.json beside them


def _close(actual: np.ndarray, expected: torch.Tensor) -> None:
    """max |Δ| ≤ 1e-4 · max |logit| (the export bar)."""
    expected = expected.detach().numpy()
    assert np.abs(actual - expected).max() <= 1e-4 * np.abs(expected).max()


@pytest.fixture
def run(exported_run: Path) -> Path:
    """The shared tiny run (conftest): trained, folded, exported to onnx, torchscript, aoti and triton."""
    return exported_run


def _adapted(run_dir: Path) -> torch.nn.Module:
    """The unmerged adapted model, rebuilt independently of the fold stage."""
    cfg = load_config(run_dir / "config.yaml")
    model = build_model(cfg, num_classes=5)
    return vitfold.load_adapter(model, load_file(run_dir / "train" / "adapter.safetensors")).eval()


def _timm_folded(run_dir: Path) -> torch.nn.Module:
    """fold/model.safetensors loaded by timm alone, as the README tells users."""
    path = str(run_dir / "fold" / "model.safetensors")
    overlay = {"file": path, "num_classes": 5, "custom_load": False}
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=True, num_classes=5, **TINY, pretrained_cfg_overlay=overlay
    ).eval()


def test_fold_stage_output_is_plain_timm_equal_to_unmerged(run):
    folded, adapted = _timm_folded(run), _adapted(run)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        y, ref = folded(x), adapted(x)
    assert float((y - ref).norm() / ref.norm()) <= 1e-5
    manifest = json.loads((run / "manifest.json").read_text())
    digests = {f"fold/{n}": hashlib.sha256((run / "fold" / n).read_bytes()).hexdigest() for n in FOLD_FILES}
    assert manifest["stages"]["fold"]["outputs"] == digests
    assert set(manifest["stages"]) >= {"train", "fold", "export"}


@pytest.mark.parametrize("batch", [1, 5])
def test_artifacts_match_the_folded_model(run, batch):
    import onnxruntime as ort

    folded = _timm_folded(run)
    x = torch.randn(batch, 3, 16, 16)
    with torch.no_grad():
        ref = folded(x)
    session = ort.InferenceSession(str(run / "export" / "model.onnx"), providers=["CPUExecutionProvider"])
    _close(session.run(None, {"input": x.numpy()})[0], ref)
    scripted = torch.jit.load(str(run / "export" / "model.pt"))
    with torch.no_grad():
        _close(scripted(x).numpy(), ref)
    package = torch._inductor.aoti_load_package(str(run / "export" / "model.pt2"))
    with torch.no_grad():
        _close(package(x).numpy(), ref)


def test_the_onnx_file_holds_the_folded_weights_not_the_base_and_an_adapter(run):
    """The artifacts compute what the fold computes, and what the unmerged model computes too (within 1e-4):
    only the weights tell an export of the fold from an export of the unmerged model. Each folded tensor is
    an initializer of the ONNX file (a linear weight transposed), and the file holds nothing more (no s_in,
    s_out, f beside base weights)."""
    from onnx import numpy_helper

    adapter = load_file(run / "train" / "adapter.safetensors")
    assert all(float(adapter[f"blocks.0.attn.qkv.{k}"].abs().min()) > 0 for k in ("s_in", "s_out"))  # not W' = W
    folded = {k: v.numpy() for k, v in load_file(run / "fold" / "model.safetensors").items()}
    initializers = [numpy_helper.to_array(t) for t in onnx.load(str(run / "export" / "model.onnx")).graph.initializer]

    def held(value: np.ndarray) -> bool:
        return any(np.array_equal(a, value) or np.array_equal(a, value.T) for a in initializers)

    assert [k for k, v in folded.items() if not held(v)] == []
    assert sum(a.size for a in initializers) < sum(v.size for v in folded.values()) + 64  # + shape constants


def test_triton_repository_lists_the_built_artifacts(run):
    configs = sorted(p.relative_to(run / "triton").as_posix() for p in (run / "triton").rglob("config.pbtxt"))
    assert configs == ["vit_tiny_patch16_224_onnx/config.pbtxt", "vit_tiny_patch16_224_torchscript/config.pbtxt"]


def test_changed_artifact_is_refused_by_hash(run, tmp_path):
    copy_dir = tmp_path / "copy"
    shutil.copytree(run, copy_dir, ignore=shutil.ignore_patterns("export", "triton"))
    model_file = copy_dir / "fold" / "model.safetensors"
    data = bytearray(model_file.read_bytes())
    data[-1] ^= 0xFF
    model_file.write_bytes(bytes(data))
    with pytest.raises(VitfoldError, match="does not match the sha256 the fold stage recorded"):
        run_stage("export", copy_dir, formats=["onnx"], triton=None, **QUIET)


def test_fold_stage_refuses_nan_adapter_and_writes_nothing(run, tmp_path):
    bad = tmp_path / "bad"
    (bad / "train").mkdir(parents=True)
    shutil.copy(run / "config.yaml", bad / "config.yaml")
    from safetensors import safe_open

    src = run / "train" / "adapter.safetensors"
    with safe_open(src, "pt") as f:
        meta = f.metadata()
    state = load_file(src)
    state["blocks.1.mlp.fc1.s_in"][0, 3] = float("nan")
    save_file(state, bad / "train" / "adapter.safetensors", metadata=meta)
    with pytest.raises(FoldError, match=r"blocks\.1\.mlp\.fc1\.s_in"):
        run_stage("fold", bad, **QUIET)
    assert not [n for n in FOLD_FILES if (bad / "fold" / n).exists()]


def test_interrupted_onnx_export_leaves_no_finished_looking_file(tmp_path, monkeypatch):
    model = timm.create_model("vit_tiny_patch16_224", num_classes=3, **TINY).eval()

    def broken_check(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(onnx.checker, "check_model", broken_check)
    with pytest.raises(RuntimeError, match="interrupted"):
        export_onnx(model, tmp_path / "export" / "model.onnx", (16, 16))
    assert list((tmp_path / "export").iterdir()) == []


def _onnx_signature(path: Path) -> tuple[collections.Counter, int]:
    graph = onnx.load(str(path)).graph
    weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT and t.dims]  # not constants
    return collections.Counter(n.op_type for n in graph.node), sum(int(np.prod(t.dims)) for t in weights)


@pytest.mark.parametrize("method", ["rlrr", "efft2", "lora"])
def test_onnx_of_folded_model_is_the_base_architecture(tmp_path, method):
    options = {"rlrr": {}, "efft2": {"rank": 4}, "lora": {"rank": 4}}[method]
    torch.manual_seed(0)
    base = timm.create_model("vit_tiny_patch16_224", num_classes=6, **TINY).eval()
    randomize_trainable(base, seed=2)  # "pretrained": no two tensors equal (the exporter shares equal constants)
    adapted = vitfold.adapt(copy.deepcopy(base), method, **options)
    randomize_trainable(adapted)
    export_onnx(vitfold.fold(adapted), tmp_path / "folded" / "model.onnx", (16, 16))
    export_onnx(base, tmp_path / "base" / "model.onnx", (16, 16))
    folded_ops, folded_params = _onnx_signature(tmp_path / "folded" / "model.onnx")
    base_ops, base_params = _onnx_signature(tmp_path / "base" / "model.onnx")
    assert folded_ops == base_ops
    assert folded_params == base_params
    assert 0 <= base_params - sum(p.numel() for p in base.parameters()) <= 8  # + the exporter's scalar constants


@pytest.mark.slow
def test_vit_base_onnx_matches_folded_at_batch_1_and_5(tmp_path):
    import onnxruntime as ort

    torch.manual_seed(0)  # ViT-B's width, heads, MLP and 224² input; 3 of its 12 blocks (the graph repeats them)
    base = timm.create_model("vit_base_patch16_224", depth=3).eval()
    adapted = vitfold.adapt(base, "rlrr", num_classes=10)
    randomize_trainable(adapted, std=0.05)
    folded = vitfold.fold(adapted).eval()
    path = tmp_path / "model.onnx"
    export_onnx(folded, path, (224, 224))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        x = torch.randn(batch, 3, 224, 224)
        with torch.no_grad():
            _close(session.run(None, {"input": x.numpy()})[0], folded(x))


def test_export_cli_errors_are_one_line_exit_2(run, tmp_path):
    """One line and exit 2, and the run's record left as it was: a format this machine cannot build is
    refused before the export stage is marked running."""
    manifest = (run / "manifest.json").read_bytes()
    for args, message in [
        (["export", str(run), "--format", "onnxx"], "--format onnxx: unknown format (choose from"),
        (["export", str(run), "--format", "tensorrt"], "tensorrt"),
        (["export", str(run), "--opset", "13", "--format", "onnx"], "'--opset': 13"),
        (["fold", str(tmp_path / "nothing")], "is not a run directory"),
    ]:
        result = vitfold_cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        lines = [line for line in result.stderr.strip().splitlines() if line and "torch.onnx" not in line]
        assert len(lines) == 1 and message in lines[0], (args, result.stderr)
    assert (run / "manifest.json").read_bytes() == manifest


def test_fp16_onnx_export_stays_close(run, tmp_path):
    import onnxruntime as ort

    copy_dir = tmp_path / "copy"
    shutil.copytree(run, copy_dir, ignore=shutil.ignore_patterns("export", "triton"))
    run_stage("export", copy_dir, formats=["onnx"], precision="fp16", triton=None, **QUIET)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        ref = _timm_folded(copy_dir)(x).numpy()
    session = ort.InferenceSession(str(copy_dir / "export" / "model.fp16.onnx"), providers=["CPUExecutionProvider"])
    out = session.run(None, {"input": x.numpy()})[0]
    assert out.dtype == np.float32
    assert np.abs(out - ref).max() <= 2e-2 * np.abs(ref).max()
    assert yaml.safe_load((copy_dir / "config.yaml").read_text())["method"] == "rlrr"
    result = run_stage("verify", copy_dir, backends=["onnxruntime-fp16"], batch_sizes=[1, 3], samples=4, **QUIET)
    rows = [r for r in result["results"] if r["backend"] == "onnxruntime-fp16"]
    assert result["passed"] and len(rows) == 2 and all(r["precision"] == "fp16" for r in rows)
    assert all(1e-6 < r["max_rel"] <= 2e-2 for r in rows)  # fp16 rounding shows, within the fp16 tolerance


def test_triton_from_the_recorded_artifacts_changes_nothing_the_run_records(run, tmp_path):
    """`vitfold triton RUN DIR` serves the artifacts as exported (same bytes as the manifest's sha256) and
    leaves the manifest and every artifact alone, so verify stays up to date; a changed artifact is refused;
    `--force` on export is gone (it meant "rerun a stage" on `vitfold run`)."""
    copy_dir = tmp_path / "run"
    shutil.copytree(run, copy_dir, ignore=shutil.ignore_patterns("triton"))
    manifest = (copy_dir / "manifest.json").read_bytes()
    before = {p: p.read_bytes() for p in (copy_dir / "export").iterdir() if p.name != "export.json"}
    result = vitfold_cli("triton", str(copy_dir), str(tmp_path / "repo"))
    assert result.returncode == 0, result.stderr
    served = tmp_path / "repo" / "vit_tiny_patch16_224_onnx" / "1" / "model.onnx"
    recorded = json.loads(manifest)["stages"]["export"]["outputs"]["export/model.onnx"]
    assert hashlib.sha256(served.read_bytes()).hexdigest() == recorded
    assert (copy_dir / "manifest.json").read_bytes() == manifest
    assert {p: p.read_bytes() for p in (copy_dir / "export").iterdir() if p.name != "export.json"} == before
    again = vitfold_cli("triton", str(copy_dir), str(tmp_path / "repo"))  # its own folders: replaced
    assert again.returncode == 0, again.stderr
    (copy_dir / "export" / "model.pt").write_bytes(b"changed")
    refused = vitfold_cli("triton", str(copy_dir), str(tmp_path / "other"))
    assert refused.returncode == 2 and "does not match the sha256" in refused.stderr, refused.stderr
    assert vitfold_cli("export", str(copy_dir), "--force").returncode == 2
