"""FP16 ONNX: weights and most ops in float16, the numerically fragile ops kept in float32.

LayerNormalization (mean/variance over 192-1024 values), Softmax (exp of attention logits), the
reductions and Pow/Sqrt/Erf-style ops lose too much in float16, so they stay float32 with Casts
around them. The graph's input and output stay float32 (`keep_io_types`), so callers and Triton
configs do not change with the precision. This is also the FP16 ONNX a strongly typed TensorRT 11
build needs.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from vitfold.export.artifacts import staged_files

FP32_OPS = (
    "LayerNormalization",
    "Softmax",
    "ReduceMean",
    "ReduceSum",
    "ReduceMax",
    "ReduceL2",
    "Pow",
    "Sqrt",
    "Reciprocal",
    "Exp",
    "Log",
    "Erf",
)


def convert_onnx_fp16(src: Path, dst: Path) -> Path:
    """Write `dst`, the float16 version of the float32 ONNX at `src`, atomically; returns `dst`."""
    import onnx
    from onnxconverter_common import float16

    model = onnx.load(str(src))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "number truncated to 1e-07": tiny weights clamped to fp16's range
        converted = float16.convert_float_to_float16(
            model, keep_io_types=True, op_block_list=list(FP32_OPS), disable_shape_infer=True
        )
    with staged_files(dst.parent) as tmp:
        onnx.save(converted, str(tmp / dst.name))
        onnx.checker.check_model(str(tmp / dst.name), full_check=True)
    return dst
