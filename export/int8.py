"""INT8 ONNX for CPUs (and TensorRT's explicit-quantization path), by ONNX Runtime's quantizer.

For a weight W (out, in) and an activation a:

    static  (default, QDQ):  q(W) = round(W / s_W[o]) int8, s_W[o] = max|W[o, :]| / 127  (per output channel)
                             q(a) = round(a / s_a) + z_a  uint8, s_a and z_a from min/max of `a` over
                             the calibration images; each quantized op reads DequantizeLinear(q(.)),
                             which is the QDQ form TensorRT's INT8 path reads too.
    dynamic:                 q(W) as above; s_a and z_a computed per call (no calibration).

Only MatMul/Gemm with a constant weight are quantized (qkv, proj, fc1, fc2 and, unless `quantize_head`
is false, the head): measured on ViT-S/16 (docs/benchmarks.md), quantizing the patch-embedding Conv too
lowers the output cosine from 0.995 to 0.987, and LayerNorm, Softmax, GELU and the attention's
activation-by-activation matmuls stay float32.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from vitfold.errors import VitfoldError
from vitfold.export.artifacts import INPUT_NAME, OUTPUT_NAME, staged_files

INT8_MODES = ("static", "dynamic")
QUANTIZED_OPS = ["MatMul", "Gemm"]
CALIBRATION_BATCH = 8


class _Calibration:
    """ONNX Runtime's CalibrationDataReader over an image tensor, CALIBRATION_BATCH images at a time."""

    def __init__(self, images: torch.Tensor) -> None:
        self._batches: Iterator[torch.Tensor] = iter(images.float().split(CALIBRATION_BATCH))

    def get_next(self) -> dict | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch.contiguous().numpy()}


def _head_nodes(path: Path) -> list[str]:
    """The MatMul/Gemm node(s) whose output feeds the graph's logits through Add/Identity only."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    producer = {out: node for node in graph.node for out in node.output}
    node, found = producer.get(OUTPUT_NAME), []
    while node is not None and not found:
        if node.op_type in QUANTIZED_OPS:
            found.append(node.name)
        elif node.op_type in ("Add", "Identity"):
            node = next((producer[i] for i in node.input if i in producer), None)
        else:
            node = None
    return found


def quantize_onnx_int8(
    src: Path,
    dst: Path,
    calibration: torch.Tensor | None,
    *,
    mode: str = "static",
    quantize_head: bool = True,
) -> Path:
    """Write `dst`, the INT8 version of the fp32 ONNX at `src`, atomically; returns `dst`.

    `calibration`: (N, 3, H, W) images as the model reads them (normalised); needed for `static`."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if mode not in INT8_MODES:
        raise VitfoldError(f"int8 mode '{mode}': use {' or '.join(INT8_MODES)}")
    if mode == "static" and (calibration is None or len(calibration) == 0):
        raise VitfoldError("int8 static quantization needs calibration images")
    excluded = [] if quantize_head else _head_nodes(src)
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".int8-") as work:
        prepared = Path(work) / "prepared.onnx"
        quant_pre_process(str(src), str(prepared))  # shape inference, so every MatMul's shapes are known
        with staged_files(dst.parent) as tmp:
            common = {
                "per_channel": True,
                "weight_type": QuantType.QInt8,
                "op_types_to_quantize": QUANTIZED_OPS,
                "nodes_to_exclude": excluded,
                "extra_options": {"MatMulConstBOnly": True},
            }
            if mode == "static":
                quantize_static(
                    str(prepared),
                    str(tmp / dst.name),
                    _Calibration(calibration),
                    quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8,
                    **common,
                )
            else:
                quantize_dynamic(str(prepared), str(tmp / dst.name), **common)
    return dst
