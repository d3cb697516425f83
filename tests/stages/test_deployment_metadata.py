"""Preprocessing and class names travel with every artifact: RUN/fold as a timm model folder,
the ONNX metadata, export.json and the Triton repository (every config.pbtxt parsed with Triton's own
ModelConfig schema), Triton model names and replacement rules, and bench refusing a changed input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch
from google.protobuf import text_format
from PIL import Image
from tritonclient.grpc import model_config_pb2

from vitfold.errors import VitfoldError
from vitfold.export.triton import write_triton_repository
from vitfold.pipeline.data import ImageTransform
from vitfold.pipeline.stages import RunDir, run_stage
from vitfold.pipeline.stages.backends import folded_model

from helpers import CLASS_NAMES, MEAN, QUIET, STD, TINY_RUN, copy_run

# What the tiny run (conftest's exported_run: digits 5-9, RLRR, 16x16) must record, written out here
# rather than read from the code under test: the digits name themselves (not by their indices); the run's
# own per-channel mean and std (all different, so a swap shows); the digits are upscaled to the model's
# input (bicubic, no crop).
PREPROCESSING = {
    "input_size": [3, 16, 16],
    "interpolation": "bicubic",
    "mean": list(MEAN),
    "std": list(STD),
    "crop_pct": 1.0,
    "crop_mode": "squash",
}

LOAD_IN_A_FRESH_PROCESS = """
import json, sys, timm, torch
model = timm.create_model("local-dir:" + sys.argv[1], pretrained=True).eval()
x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    logits = model(x).tolist()
data = timm.data.resolve_data_config(model=model)
print(json.dumps({"num_classes": model.num_classes, "labels": model.pretrained_cfg["label_names"],
                  "data": {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}, "logits": logits}))
"""


def test_fold_folder_loads_in_plain_timm_with_classes_data_config_and_the_folded_weights(exported_run):
    done = subprocess.run(
        [sys.executable, "-c", LOAD_IN_A_FRESH_PROCESS, str(exported_run / "fold")],
        capture_output=True,
        text=True,
        check=True,
    )
    loaded = json.loads(done.stdout.splitlines()[-1])
    assert loaded["num_classes"] == len(CLASS_NAMES) and loaded["labels"] == CLASS_NAMES
    assert loaded["data"] == PREPROCESSING
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = folded_model(RunDir(exported_run))(x)  # torch-folded: the recorded timm call
        fresh = timm.create_model(TINY_RUN["backbone"], num_classes=5, **TINY_RUN["backbone_kwargs"]).eval()(x)
    np.testing.assert_allclose(loaded["logits"], expected.numpy(), rtol=0, atol=1e-6)
    assert not np.allclose(loaded["logits"], fresh.numpy(), atol=1e-3)  # the weights came from the folder


@pytest.mark.parametrize("crop", [False, True])
def test_data_config_rebuilds_the_evaluation_transform_in_timm(crop):
    transform = ImageTransform((24, 20), (0.4, 0.5, 0.6), (0.2, 0.3, 0.25), crop=crop)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (41, 37, 3), dtype=np.uint8))
    ours = transform.pil(train=False)(image)
    config = transform.data_config()
    theirs = timm.data.create_transform(**config, is_training=False)(image)  # timm's reading of the config
    assert ours.shape == theirs.shape == (3, 24, 20)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_onnx_metadata_and_export_json_carry_preprocessing_and_class_names(exported_run):
    session = ort.InferenceSession(str(exported_run / "export" / "model.onnx"), providers=["CPUExecutionProvider"])
    found = {k: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}
    assert found == {**PREPROCESSING, "class_names": CLASS_NAMES}
    summary = json.loads((exported_run / "export" / "export.json").read_text())
    assert summary["preprocessing"] == PREPROCESSING and summary["class_names"] == CLASS_NAMES


def test_every_triton_config_parses_with_tritons_schema_and_names_its_labels(exported_run):
    configs = sorted((exported_run / "triton").rglob("config.pbtxt"))
    assert [c.parent.name for c in configs] == ["vit_tiny_patch16_224_onnx", "vit_tiny_patch16_224_torchscript"]
    for path in configs:
        config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        assert config.name == path.parent.name
        assert config.max_batch_size == 8  # the largest of verify.batch_sizes [1, 8]
        assert list(config.input[0].dims) == PREPROCESSING["input_size"]
        (output,) = config.output
        assert list(output.dims) == [len(CLASS_NAMES)] and output.label_filename == "labels.txt"
        assert (path.parent / output.label_filename).read_text().splitlines() == CLASS_NAMES


def _fake_artifacts(tmp_path: Path) -> dict[str, Path]:
    files = {}
    for key in ("onnx", "onnx-fp16", "onnx-int8", "torchscript", "tensorrt-int8"):
        files[key] = tmp_path / f"{key}.bin"
        files[key].write_bytes(key.encode())
    return files


def _write(repo: Path, artifacts: dict[str, Path], **kwargs) -> list[Path]:
    return write_triton_repository(
        repo,
        artifacts,
        model_name="vit",
        input_name="input",
        output_name="logits",
        image_shape=(3, 16, 16),
        num_classes=2,
        max_batch_size=4,
        labels="cat\ndog\n",
        **kwargs,
    )


def test_triton_precisions_get_their_own_models_and_a_foreign_folder_needs_force(tmp_path):
    repo, artifacts = tmp_path / "repo", _fake_artifacts(tmp_path)
    configs = _write(repo, artifacts)
    parsed = {c.parent.name: text_format.Parse(c.read_text(), model_config_pb2.ModelConfig()) for c in configs}
    assert {name: c.platform for name, c in parsed.items()} == {
        "vit_onnx": "onnxruntime_onnx",
        "vit_onnx_fp16": "onnxruntime_onnx",
        "vit_onnx_int8": "onnxruntime_onnx",
        "vit_torchscript": "pytorch_libtorch",
        "vit_tensorrt_int8": "tensorrt_plan",
    }
    assert (repo / "vit_onnx_int8" / "1" / "model.onnx").read_bytes() == b"onnx-int8"
    assert (repo / "vit_tensorrt_int8" / "1" / "model.plan").read_bytes() == b"tensorrt-int8"
    assert (repo / "vit_onnx" / "1" / "model.onnx").read_bytes() == b"onnx"
    (repo / "vit_onnx" / "1" / "model.onnx").write_bytes(b"someone else's model")
    with pytest.raises(VitfoldError, match=r"vit_onnx exists already: pass --force"):
        _write(repo, {"onnx": artifacts["onnx"]})
    assert (repo / "vit_onnx" / "1" / "model.onnx").read_bytes() == b"someone else's model"
    _write(repo, {"onnx": artifacts["onnx"]}, replaceable={"vit_onnx"})
    assert (repo / "vit_onnx" / "1" / "model.onnx").read_bytes() == b"onnx"
    _write(repo, {"onnx": artifacts["onnx-fp16"]}, force=True)
    assert (repo / "vit_onnx" / "1" / "model.onnx").read_bytes() == b"onnx-fp16"


def test_export_stage_names_models_and_refuses_a_foreign_folder_before_any_work(exported_run, tmp_path):
    run = copy_run(exported_run, tmp_path / "run")
    repo = tmp_path / "repo"
    (repo / "demo_onnx").mkdir(parents=True)
    before = (run / "export" / "export.json").read_bytes()
    with pytest.raises(VitfoldError, match="demo_onnx exists already"):
        run_stage("export", run, formats=["onnx"], triton=str(repo), triton_name="demo", **QUIET)
    assert (run / "export" / "export.json").read_bytes() == before  # nothing exported
    run_stage(
        "export",
        run,
        formats=["onnx"],
        triton=str(repo),
        triton_name="demo",
        triton_max_batch=3,
        triton_force=True,
        **QUIET,
    )
    again = dict(formats=["onnx"], triton=str(repo), triton_name="demo", triton_max_batch=3)
    run_stage("export", run, **again, **QUIET)  # its own folder from the last export: no --force needed
    config = text_format.Parse((repo / "demo_onnx" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.name == "demo_onnx" and config.max_batch_size == 3


def test_bench_refuses_a_changed_folded_model_instead_of_skipping_it(exported_run, tmp_path):
    run = copy_run(exported_run, tmp_path / "run")
    folded = run / "fold" / "model.safetensors"
    data = bytearray(folded.read_bytes())
    data[-1] ^= 0xFF
    folded.write_bytes(bytes(data))
    with pytest.raises(VitfoldError, match="does not match the sha256 the fold stage recorded"):
        run_stage("bench", run, backends=["torch-folded", "torch-base"], **QUIET)
