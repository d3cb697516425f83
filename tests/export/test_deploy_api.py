"""The deployment API on a model object and plain paths, with no run directory: adapt a tiny ViT, set its
adapters at random (no training), fold it, export it with `vitfold.export.export` into a plain folder, open
each artifact by path with `open_runner`, and `compare` it with the unmerged adapted model."""

from __future__ import annotations

import pytest
import torch

import vitfold
from vitfold.errors import VitfoldError
from vitfold.export import FILES, compare, export, open_runner

from helpers import TINY, images, make_vit, randomize_trainable

RUNTIME_OF = {"onnx": "onnxruntime", "onnx-fp16": "onnxruntime", "torchscript": "torchscript", "aoti": "aoti"}


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    name, kwargs = TINY
    adapted = vitfold.adapt(make_vit(name, **kwargs), "rlrr", num_classes=7)
    randomize_trainable(adapted)
    out = tmp_path_factory.mktemp("plain folder")
    files = export(
        vitfold.fold(adapted), out, formats=("onnx", "torchscript", "aoti"), input_size=(3, 32, 32), precision="fp16"
    )
    return adapted.eval(), files, out


def test_export_writes_each_format_into_the_folder(deployed):
    _, files, out = deployed
    assert files == {fmt: out / FILES[fmt] for fmt in ("onnx", "onnx-fp16", "torchscript", "aoti")}
    assert all(path.is_file() for path in files.values())
    assert not (out / "manifest.json").exists() and not (out / "config.yaml").exists()


@pytest.mark.parametrize("fmt", ["onnx", "onnx-fp16", "torchscript", "aoti"])
@pytest.mark.parametrize("batch", [1, 3])
def test_each_artifact_opened_by_path_matches_the_unmerged_model(deployed, fmt, batch):
    adapted, files, _ = deployed
    x = images(adapted, batch, seed=batch)
    with torch.no_grad():
        reference = adapted(x)
    tolerance = {"max_rel": 2e-2, "cosine_min": 0.999} if fmt == "onnx-fp16" else None
    with open_runner(RUNTIME_OF[fmt], files[fmt]) as runner:
        result = compare(reference, runner(runner.to_device(x)).cpu(), tolerance)
    assert result, result.to_dict()
    assert result.to_dict()["passed"] is True and result.stats["max_rel"] <= (2e-2 if tolerance else 1e-4)
    # the comparison can fail: the same output against a reference whose top logit moved does
    shifted = reference.clone()
    shifted[0, 0] += 1.0
    assert not compare(shifted, runner_output(files[fmt], RUNTIME_OF[fmt], x), tolerance)


def runner_output(path, runtime: str, x: torch.Tensor) -> torch.Tensor:
    with open_runner(runtime, path) as runner:
        return runner(runner.to_device(x)).cpu()


def test_torch_runner_takes_the_model_and_stats_are_the_reference_formulas(deployed):
    adapted, _, _ = deployed
    x = images(adapted, 2)
    with torch.no_grad(), open_runner("torch", vitfold.fold(adapted)) as runner:
        folded = runner(x)
        reference = adapted(x)
    result = compare(reference, folded)
    diff = (folded.double() - reference.double()).abs()
    assert result.stats["max_abs"] == pytest.approx(float(diff.max()))
    assert result.stats["max_rel"] == pytest.approx(float(diff.max() / reference.double().abs().max()))
    assert result and result.tolerance.max_rel == 1e-4


def test_bad_tolerance_key_and_missing_file_are_one_line_errors(deployed, tmp_path):
    adapted, files, _ = deployed
    logits = torch.zeros(2, 7)
    with pytest.raises(VitfoldError, match="tolerances: unknown key 'max_rell'"):
        compare(logits, logits, {"max_rell": 1e-3})
    with pytest.raises(VitfoldError, match="not found"):
        open_runner("onnxruntime", tmp_path / "nothing.onnx")
    with pytest.raises(VitfoldError, match="unknown backend 'tvm'"):
        open_runner("tvm", files["onnx"])
    with pytest.raises(VitfoldError, match=r"^input_size=\(32, 32\): must be \(3, H, W\)"):
        export(vitfold.fold(adapted), tmp_path / "x", formats=("onnx",), input_size=(32, 32))


def test_library_errors_name_the_argument_and_a_wrong_input_size_is_one_error(deployed, tmp_path):
    """From Python an error names the argument (the CLI shows the flag instead); a size the model refuses
    is one `VitfoldError` before any exporter runs, and nothing is written."""
    adapted, _, _ = deployed
    folded = vitfold.fold(adapted)
    with pytest.raises(VitfoldError, match=r"^formats='onnxx': unknown format \(choose from onnx,"):
        export(folded, tmp_path / "a", formats=("onnxx",), input_size=(3, 32, 32))
    with pytest.raises(VitfoldError, match=r"^precision='fp8': use fp32"):
        export(folded, tmp_path / "b", formats=("onnx",), input_size=(3, 32, 32), precision="fp8")
    with pytest.raises(VitfoldError, match=r"^input_size=\(3, 48, 48\): the model does not run on \(1, 3, 48, 48\)"):
        export(folded, tmp_path / "c", formats=("onnx",), input_size=(3, 48, 48))
    with pytest.raises(VitfoldError, match=r"^model: must be a torch.nn.Module, got str"):
        export("model.safetensors", tmp_path / "d", formats=("onnx",), input_size=(3, 32, 32))
    assert not any(tmp_path.iterdir())


def test_the_cuda_provider_fix_names_two_onnxruntime_distributions_when_both_are_installed(monkeypatch):
    """onnxruntime and onnxruntime-gpu own one import name: with both installed the fix says so."""
    import importlib.metadata
    from types import SimpleNamespace

    from vitfold.export.runners import ort_gpu_fix

    both = [
        SimpleNamespace(name="onnxruntime", version="1.20.1"),
        SimpleNamespace(name="onnxruntime-gpu", version="1.21.0"),
    ]
    monkeypatch.setattr(importlib.metadata, "distributions", lambda: iter(both))
    assert ort_gpu_fix().startswith("both onnxruntime 1.20.1 and onnxruntime-gpu 1.21.0 are installed")
    monkeypatch.setattr(importlib.metadata, "distributions", lambda: iter(both[:1]))
    assert ort_gpu_fix().startswith("pip install 'vitfold[gpu]', then pip uninstall -y onnxruntime onnxruntime-gpu")
