"""TensorRT engine (`.plan`) from the exported ONNX, with the `tensorrt` Python API (extra `[trt]`).

One optimisation profile covers batch min/opt/max. FP32 builds switch TF32 off unless asked, so the
engine computes what the ONNX computes. FP16:

- TensorRT 10: weakly typed network, `BuilderFlag.FP16`, and every normalization layer (LayerNorm)
  pinned to FP32 with `OBEY_PRECISION_CONSTRAINTS`.
- TensorRT 11 removed those flags: networks are strongly typed, so the FP16 ONNX of `export.fp16`
  (LayerNorm, Softmax and reductions kept FP32) is parsed and its types are obeyed as written.

INT8 reads the QDQ ONNX of `export.int8` (explicit quantization: the scales come from the file, no
TensorRT calibrator): TensorRT 10 with `BuilderFlag.INT8`, TensorRT 11 strongly typed.

The builder takes trtexec's knobs (min/opt/max batch, workspace, timing cache) and logs the
equivalent `trtexec` command line. Experimental: no run of it on a real GPU has been recorded yet.

A plan only runs on the TensorRT version and GPU that built it, so `model.json` beside it records both.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vitfold.errors import VitfoldError
from vitfold.export.artifacts import INPUT_NAME, staged_files

PROFILE_BATCH = (1, 8, 32)  # the optimisation profile's min / opt / max batch


class TensorRTUnavailable(VitfoldError):
    """tensorrt is not installed, or there is no CUDA GPU to build on (exit 2)."""


def require_tensorrt() -> Any:
    """The `tensorrt` module, or one clear error saying what is missing."""
    try:
        import tensorrt
    except ImportError:
        raise TensorRTUnavailable(
            "needs the tensorrt package and an NVIDIA GPU: pip install 'vitfold[trt]'",
            argument="formats",
            value="tensorrt",
        ) from None
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailable("needs an NVIDIA GPU; none is visible to CUDA", argument="formats", value="tensorrt")
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


def _load_timing_cache(config: Any, path: Path | None) -> Any:
    """Attach the timing cache at `path` (empty when the file does not exist yet); None without one."""
    if path is None:
        return None
    cache = config.create_timing_cache(path.read_bytes() if path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def trtexec_command(
    onnx_path: Path,
    plan_path: Path,
    precision: str,
    strongly_typed: bool,
    batch: tuple[int, int, int],
    shape: tuple[int, ...],
    tf32: bool,
    workspace_gib: float,
    timing_cache: Path | None,
) -> str:
    """The trtexec command line that builds the same engine (TensorRT 10 FP16 also pins the LayerNorms to
    FP32, which trtexec spells per layer name with --layerPrecisions)."""
    dims = ["x".join(map(str, (b, *shape))) for b in batch]
    parts = [
        "trtexec",
        f"--onnx={onnx_path}",
        f"--saveEngine={plan_path}",
        *(f"--{k}Shapes={INPUT_NAME}:{d}" for k, d in zip(("min", "opt", "max"), dims, strict=True)),
        f"--memPoolSize=workspace:{int(workspace_gib * 1024)}M",
    ]
    if strongly_typed:
        parts.append("--stronglyTyped")
    elif precision in ("fp16", "int8"):
        parts.append(f"--{precision}" + (" --precisionConstraints=obey" if precision == "fp16" else ""))
    if not tf32:
        parts.append("--noTF32")
    if timing_cache is not None:
        parts.append(f"--timingCacheFile={timing_cache}")
    return " ".join(parts)


def build_engine(
    onnx_path: Path,
    plan_path: Path,
    *,
    precision: str = "fp32",
    batch: tuple[int, int, int] = PROFILE_BATCH,
    tf32: bool = False,
    workspace_gib: float = 4.0,
    timing_cache: Path | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Build `plan_path` (and `plan_path.with_suffix('.json')`) from `onnx_path` (for int8: the QDQ ONNX);
    returns the plan. `timing_cache`: a file read (when present) and updated, as trtexec's --timingCacheFile."""
    trt = require_tensorrt()
    strongly_typed = precision in ("fp16", "int8") and _major(trt) >= 11
    source = onnx_path
    if strongly_typed and precision == "fp16":
        from vitfold.export.fp16 import convert_onnx_fp16

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
    if precision == "int8" and not strongly_typed:
        config.set_flag(trt.BuilderFlag.INT8)
    cache = _load_timing_cache(config, timing_cache)
    shape = tuple(network.get_input(0).shape)[1:]  # (3, H, W)
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, *[(b, *shape) for b in batch])
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise VitfoldError(f"TensorRT failed to build an engine from {source} (see its log above)")
    if cache is not None:
        timing_cache.write_bytes(memoryview(cache.serialize()))
    command = trtexec_command(
        source, plan_path, precision, strongly_typed, batch, shape, tf32, workspace_gib, timing_cache
    )
    if log is not None:
        log(f"tensorrt: equivalent to `{command}`")
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
        "trtexec": command,
    }
    with staged_files(plan_path.parent) as tmp:
        (tmp / plan_path.with_suffix(".json").name).write_text(json.dumps(info, indent=2) + "\n")
        (tmp / plan_path.name).write_bytes(bytes(serialized))
    return plan_path
