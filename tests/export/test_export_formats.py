"""Export pieces that need no GPU: FP16 ONNX op placement, Triton configs, and the TensorRT builder's
choices per TensorRT major version (driven through a recording stand-in of the tensorrt API, since
neither this machine nor CI has TensorRT; the real build is in test_tensorrt_gpu.py)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import onnx
import pytest
import timm
import torch

from vitfold.errors import VitfoldError
from vitfold.export.fp16 import FP32_OPS, convert_onnx_fp16
from vitfold.export.onnx import export_onnx
from vitfold.export.tensorrt import build_engine as tensorrt_build
from vitfold.export.triton import write_triton_repository

TINY = {"img_size": 16, "patch_size": 4, "depth": 2}


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=4, **TINY).eval()
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export_onnx(model, path, (16, 16))
    return path, model


def test_fp16_onnx_keeps_fragile_ops_fp32_and_io_fp32(onnx_model, tmp_path):
    src, model = onnx_model
    dst = convert_onnx_fp16(src, tmp_path / "model.fp16.onnx")
    graph = onnx.load(str(dst)).graph
    fragile = [n for n in graph.node if n.op_type in FP32_OPS]
    assert {n.op_type for n in fragile} >= {"LayerNormalization", "Softmax"}
    types = _elem_types(onnx.shape_inference.infer_shapes(onnx.load(str(dst))).graph)
    for node in fragile:  # every input of every op kept in fp32 is float32, whatever produced it
        for name in node.input:
            if name:
                assert types[name] == onnx.TensorProto.FLOAT, (node.op_type, node.name, name)
    matmul_weights = {t.name: t.data_type for t in graph.initializer if t.dims and len(t.dims) == 2}
    assert set(matmul_weights.values()) == {onnx.TensorProto.FLOAT16}
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def _elem_types(graph: onnx.GraphProto) -> dict[str, int]:
    """Element type of every tensor of a shape-inferred graph: inputs, initializers, values, constants."""
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.value_info, *graph.output]}
    types |= {t.name: t.data_type for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            value = next(a.t for a in node.attribute if a.name == "value")
            types[node.output[0]] = value.data_type
    return types


def test_triton_configs_name_the_tensors_of_each_backend(onnx_model, tmp_path):
    src, _ = onnx_model
    scripted = tmp_path / "model.pt"
    scripted.write_bytes(b"torchscript bytes")
    configs = write_triton_repository(
        tmp_path / "repo",
        {"onnx": src, "torchscript": scripted},
        model_name="vit",
        input_name="input",
        output_name="logits",
        image_shape=(3, 16, 16),
        num_classes=4,
        max_batch_size=16,
    )
    onnx_cfg, ts_cfg = (c.read_text() for c in configs)
    assert 'platform: "onnxruntime_onnx"' in onnx_cfg and 'name: "input"' in onnx_cfg and 'name: "logits"' in onnx_cfg
    assert 'platform: "pytorch_libtorch"' in ts_cfg and 'name: "INPUT__0"' in ts_cfg and "OUTPUT__0" in ts_cfg
    for cfg in (onnx_cfg, ts_cfg):
        assert "max_batch_size: 16" in cfg and "dims: [ 3, 16, 16 ]" in cfg and "dims: [ 4 ]" in cfg
        assert "dynamic_batching" in cfg
    assert (tmp_path / "repo" / "vit_onnx" / "1" / "model.onnx").read_bytes() == src.read_bytes()
    assert (tmp_path / "repo" / "vit_torchscript" / "1" / "model.pt").read_bytes() == b"torchscript bytes"
    assert not [p for p in (tmp_path / "repo").iterdir() if p.name.startswith(".")]


class _Recorder(types.SimpleNamespace):
    """Stand-in for the tensorrt API: records every flag, precision and profile the builder sets."""


def _fake_tensorrt(version: str, calls: list, parses: bool = True, builds: bool = True) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.float32 = "float32"
    trt.Logger = type("Logger", (), {"WARNING": 1, "__init__": lambda self, *a: None})
    trt.LayerType = types.SimpleNamespace(NORMALIZATION="norm", MATRIX_MULTIPLY="mm")
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=0)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    trt.BuilderFlag = types.SimpleNamespace(TF32="TF32", FP16="FP16", INT8="INT8", OBEY_PRECISION_CONSTRAINTS="OBEY")
    layers = [_Recorder(type=t, num_outputs=1, precision=None, outputs={}) for t in ("mm", "norm", "mm", "norm")]
    for layer in layers:
        layer.set_output_type = lambda j, dt, layer=layer: layer.outputs.__setitem__(j, dt)

    class Network:
        num_layers = len(layers)

        def get_layer(self, i):
            return layers[i]

        def get_input(self, i):
            return _Recorder(shape=(-1, 3, 16, 16))

    class Parser:
        num_errors = 0 if parses else 1

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            calls.append(("parse", Path(path).name))
            return parses

        def get_error(self, i):
            return "unsupported operator Foo"

    class Config:
        def set_memory_pool_limit(self, pool, size):
            calls.append(("workspace", size))

        def set_flag(self, flag):
            calls.append(("set", flag))

        def clear_flag(self, flag):
            calls.append(("clear", flag))

        def add_optimization_profile(self, profile):
            calls.append(("profile", profile.shapes))

        def create_timing_cache(self, data):
            calls.append(("cache_read", bytes(data)))
            return _Recorder(serialize=lambda: b"timings")

        def set_timing_cache(self, cache, ignore_mismatch):
            calls.append(("cache_set", ignore_mismatch))

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            calls.append(("network_flags", flags))
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            profile = _Recorder(shapes={})
            profile.set_shape = lambda name, *s: profile.shapes.__setitem__(name, s)
            return profile

        def build_serialized_network(self, network, config):
            return b"plan bytes" if builds else None

    trt.OnnxParser, trt.Builder, trt._layers = Parser, Builder, layers
    return trt


@pytest.fixture
def fake_trt(onnx_model, tmp_path, monkeypatch):
    """Build with a recording stand-in: fake_trt(version, **knobs) -> (trt, calls, build(**kwargs))."""
    import vitfold.export.tensorrt as tensorrt_export

    monkeypatch.setattr(tensorrt_export, "_device", lambda: {"gpu": "test GPU", "compute_capability": "9.0"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    src, _ = onnx_model
    onnx_copy = tmp_path / "model.onnx"
    onnx_copy.write_bytes(src.read_bytes())

    def make(version: str, **knobs):
        calls: list = []
        trt = _fake_tensorrt(version, calls, **knobs)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)

        def build(**kwargs):
            return tensorrt_export.build_engine(onnx_copy, tmp_path / "model.plan", batch=(1, 4, 16), **kwargs)

        return trt, calls, build

    return make


@pytest.mark.parametrize("version", ["10.9.0", "11.1.0"])
def test_tensorrt_fp16_build_choices_per_major_version(fake_trt, tmp_path, version):
    trt, calls, build = fake_trt(version)
    plan = build(precision="fp16")
    info = json.loads(plan.with_suffix(".json").read_text())
    assert plan.read_bytes() == b"plan bytes" and info["tensorrt"] == version
    assert ("clear", "TF32") in calls
    assert ("profile", {"input": ((1, 3, 16, 16), (4, 3, 16, 16), (16, 3, 16, 16))}) in calls
    if version.startswith("10"):
        assert ("network_flags", 0) in calls and ("parse", "model.onnx") in calls
        assert ("set", "FP16") in calls and ("set", "OBEY") in calls
        assert [layer.precision for layer in trt._layers] == [None, "float32", None, "float32"]
        assert [layer.outputs for layer in trt._layers] == [{}, {0: "float32"}, {}, {0: "float32"}]  # outputs pinned
        assert info["normalization_layers_fp32"] == 2 and not info["strongly_typed"]
    else:
        assert ("network_flags", 1) in calls and ("parse", "model.fp16.onnx") in calls
        assert not [c for c in calls if c[0] == "set"]  # the removed precision flags are never touched
        assert (tmp_path / "model.fp16.onnx").is_file() and info["strongly_typed"]


@pytest.mark.parametrize("version", ["10.9.0", "11.1.0"])
@pytest.mark.parametrize("tf32", [False, True])
def test_tensorrt_fp32_build_is_weakly_typed_and_tf32_only_when_asked(fake_trt, tmp_path, version, tf32):
    trt, calls, build = fake_trt(version)
    info = json.loads(build(precision="fp32", tf32=tf32).with_suffix(".json").read_text())
    assert ("network_flags", 0) in calls and ("parse", "model.onnx") in calls  # fp32: the fp32 ONNX, no typing
    assert (("clear", "TF32") in calls) is not tf32
    assert not [c for c in calls if c[0] == "set"] and all(layer.precision is None for layer in trt._layers)
    assert info["tf32"] is tf32 and info["precision"] == "fp32" and not info["strongly_typed"]


@pytest.mark.parametrize("version", ["10.9.0", "11.1.0"])
def test_tensorrt_int8_reads_the_qdq_onnx_and_logs_its_trtexec_line(fake_trt, tmp_path, version):
    trt, calls, build = fake_trt(version)
    qdq = tmp_path / "model.int8.onnx"
    qdq.write_bytes((tmp_path / "model.onnx").read_bytes())
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"earlier timings")
    lines: list[str] = []
    plan = tensorrt_build(
        qdq, tmp_path / "model.plan", precision="int8", batch=(1, 4, 16), timing_cache=cache, log=lines.append
    )
    info = json.loads(plan.with_suffix(".json").read_text())
    assert ("parse", "model.int8.onnx") in calls and info["precision"] == "int8"
    if version.startswith("10"):  # explicit quantization in a weakly typed network
        assert ("set", "INT8") in calls and ("network_flags", 0) in calls
    else:
        assert ("network_flags", 1) in calls and not [c for c in calls if c[0] == "set"]
    assert ("cache_read", b"earlier timings") in calls and cache.read_bytes() == b"timings"  # read, then updated
    command = info["trtexec"]
    for part in (f"--onnx={qdq}", "--minShapes=input:1x3x16x16", "--optShapes=input:4x3x16x16", "--noTF32"):
        assert part in command
    assert "--maxShapes=input:16x3x16x16" in command and f"--timingCacheFile={cache}" in command
    assert ("--int8" in command) is version.startswith("10") and (
        "--stronglyTyped" in command
    ) is not version.startswith("10")
    assert lines == [f"tensorrt: equivalent to `{command}`"]


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"parses": False}, "could not parse .*unsupported operator Foo"),
        ({"builds": False}, "failed to build an engine"),
    ],
)
def test_tensorrt_parse_and_build_failures_are_one_line_and_write_nothing(fake_trt, tmp_path, knobs, message):
    _, _, build = fake_trt("10.9.0", **knobs)
    with pytest.raises(VitfoldError, match=message):
        build(precision="fp16")
    assert not (tmp_path / "model.plan").exists() and not (tmp_path / "model.json").exists()
