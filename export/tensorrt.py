"""TensorRT engine (`.plan`) from the exported ONNX, with the `tensorrt` Python API (extra `[trt]`).

One optimisation profile covers batch min/opt/max. FP32 builds switch TF32 off unless asked, so the
engine computes what the ONNX computes. FP16:

- TensorRT 10: weakly typed network, `BuilderFlag.FP16`, and every normalization layer (LayerNorm)
  pinned to FP32 with `OBEY_PRECISION_CONSTRAINTS`.
- TensorRT 11 removed those flags: networks are strongly typed, so the FP16 ONNX of `export.fp16`
  (LayerNorm, Softmax and reductions kept FP32) is parsed and its types are obeyed as written.

A plan only runs on the TensorRT version and GPU that built it, so `model.json` beside it records both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vitfold.errors import VitfoldError
from vitfold.export.artifacts import INPUT_NAME, staged_files


class TensorRTUnavailable(VitfoldError):
    """tensorrt is not installed, or there is no CUDA GPU to build on (exit 2)."""


def require_tensorrt() -> Any:
    """The `tensorrt` module, or one clear error saying what is missing."""
    try:
        import tensorrt
    except ImportError:
        raise TensorRTUnavailable(
            "--format tensorrt needs the tensorrt package and an NVIDIA GPU: pip install 'vitfold[trt]'"
        ) from None
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailable("--format tensorrt needs an NVIDIA GPU; none is visible to CUDA")
    return tensorrt


def _major(trt: Any) -> int:
    return int(trt.__version__.split(".")[0])


def _parse(trt: Any, builder: Any, onnx_path: Path, strongly_typed: bool) -> Any:
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, trt.Logger(trt.Logger.WARNING))
    if not parser.parse_from_file(str(onnx_path)):  # resolves a .onnx.data file beside it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise VitfoldError(f"TensorRT could not parse {onnx_path}: {errors}")
    return network


def _pin_normalization_fp32(trt: Any, network: Any) -> int:
    """TensorRT 10 FP16: keep every normalization layer (LayerNorm) in FP32; returns how many."""
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == trt.LayerType.NORMALIZATION:
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
            pinned += 1
    return pinned


def _device() -> dict[str, Any]:
    import torch

    major, minor = torch.cuda.get_device_capability()
    return {"gpu": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}


def build_engine(
    onnx_path: Path,
    plan_path: Path,
    *,
    precision: str = "fp32",
    batch: tuple[int, int, int] = (1, 8, 32),
    tf32: bool = False,
    workspace_gib: float = 4.0,
) -> Path:
    """Build `plan_path` (and `plan_path.with_suffix('.json')`) from `onnx_path`; returns the plan."""
    trt = require_tensorrt()
    strongly_typed = precision == "fp16" and _major(trt) >= 11
    source = onnx_path
    if strongly_typed:
        from export.fp16 import convert_onnx_fp16

        source = convert_onnx_fp16(onnx_path, onnx_path.with_name(onnx_path.stem + ".fp16.onnx"))
    builder = trt.Builder(trt.Logger(trt.Logger.WARNING))
    network = _parse(trt, builder, source, strongly_typed)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if not tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    pinned = 0
    if precision == "fp16" and not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        pinned = _pin_normalization_fp32(trt, network)
    shape = tuple(network.get_input(0).shape)[1:]  # (3, H, W)
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, *[(b, *shape) for b in batch])
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise VitfoldError(f"TensorRT failed to build an engine from {source} (see its log above)")
    info = {
        "tensorrt": trt.__version__,
        **_device(),
        "precision": precision,
        "tf32": tf32,
        "strongly_typed": strongly_typed,
        "normalization_layers_fp32": pinned,
        "batch_min_opt_max": list(batch),
        "input_shape": list(shape),
        "onnx": source.name,
    }
    with staged_files(plan_path.parent) as tmp:
        (tmp / plan_path.with_suffix(".json").name).write_text(json.dumps(info, indent=2) + "\n")
        (tmp / plan_path.name).write_bytes(bytes(serialized))
    return plan_path
