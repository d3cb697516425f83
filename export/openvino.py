"""OpenVINO IR for CPUs: the fp32 ONNX read by OpenVINO as it is, saved as `model.xml` + `model.bin`, and
its reduced-precision variants.

    fp32  model.xml        the ONNX graph in OpenVINO's opset, fp32 weights (no fp16 compression)
    bf16  model.bf16.xml   the same graph and weights; its runtime info asks for bf16 execution
                           (`runtime_options/INFERENCE_PRECISION_HINT = bf16`, which OpenVINO applies when
                           it compiles the model): matmuls on the CPU's native BF16 units, fp32 in and out
    int8  model.int8.xml   `nncf.quantize` with `ModelType.TRANSFORMER` (SmoothQuant, fast bias correction,
                           the attention's matmuls quantized too), calibrated on the same seeded training
                           images as the ONNX INT8; FakeQuantize ops in the IR, which the CPU plugin runs as
                           INT8 kernels (VNNI); everything left in float runs in fp32

For an NNCF quantizer, with s and z from the calibration statistics (preset `mixed`: weights symmetric
per output channel, activations asymmetric per tensor):

    q(a) = clamp(round(a / s_a) + z_a, 0, 255)       q(W)[o] = clamp(round(W[o] / s_W[o]), -128, 127)

The model's preprocessing and class names (ONNX `metadata_props`) are copied into every IR's runtime
info under `model_info/<key>` (the same JSON values), which `openvino.Core().read_model(...).get_rt_info()`
returns. OpenVINO's own default precision on a CPU with BF16 is bf16, so every IR records the precision
it was made for, and the runner passes it explicitly.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from vitfold.errors import VitfoldError
from vitfold.export.artifacts import staged_files

EXTRA = "pip install 'vitfold[openvino]'"
# vitfold precision -> OpenVINO's INFERENCE_PRECISION_HINT for the ops the IR leaves in float
PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}
RUNTIME_PRECISION = ("runtime_options", "INFERENCE_PRECISION_HINT")
IR_PRECISION = ("vitfold", "precision")  # the vitfold precision an IR was written for
MODEL_INFO = "model_info"
INT8_PRESET = "mixed"  # NNCF's transformer default: symmetric weights, asymmetric activations
CALIBRATION_BATCH = 8


def require_openvino(nncf: bool = False) -> ModuleType:
    """The openvino module (and, with `nncf`, check that NNCF is importable too); one line naming the extra
    when either is missing."""
    for name in ("openvino", "nncf") if nncf else ("openvino",):
        try:
            importlib.import_module(name)
        except ImportError:
            what = "--format openvino" + (" --precision int8" if name == "nncf" else "")
            raise VitfoldError(f"{what} needs the {name} package: {EXTRA}") from None
    return importlib.import_module("openvino")


def int8_settings(calibration_images: int) -> dict[str, Any]:
    """How the OpenVINO INT8 IR is quantized (export.json records it)."""
    return {
        "quantizer": "nncf",
        "model_type": "transformer",
        "preset": INT8_PRESET,
        "subset_size": calibration_images,
        "fast_bias_correction": True,
    }


def _quantize(model: Any, calibration: torch.Tensor) -> Any:
    """`model` (an ov.Model) quantized by NNCF's post-training quantization for transformers."""
    import nncf

    logging.getLogger("nncf").setLevel(logging.ERROR)  # its progress bars and notes are not vitfold's output
    batches = list(calibration.float().split(CALIBRATION_BATCH))
    dataset = nncf.Dataset(batches, lambda batch: batch.contiguous().numpy())
    settings = int8_settings(len(calibration))
    return nncf.quantize(
        model,
        dataset,
        model_type=nncf.ModelType.TRANSFORMER,
        preset=nncf.QuantizationPreset(settings["preset"]),
        subset_size=settings["subset_size"],
        fast_bias_correction=settings["fast_bias_correction"],
    )


def export_openvino(
    onnx_path: Path,
    dst: Path,
    precision: str = "fp32",
    metadata: dict[str, str] | None = None,
    calibration: torch.Tensor | None = None,
) -> list[Path]:
    """Write the IR `dst` (`.xml`) and its `.bin` atomically from the fp32 ONNX at `onnx_path`, for
    `precision` (fp32, bf16, int8: quantized on `calibration`, (N, 3, H, W) normalised images); returns
    [xml, bin]. `metadata` goes into the runtime info under `model_info/`."""
    ov = require_openvino(nncf=precision == "int8")
    if precision not in PRECISION_HINTS:
        raise VitfoldError(f"--precision {precision}: OpenVINO IR is written at {', '.join(PRECISION_HINTS)}")
    if precision == "int8" and (calibration is None or len(calibration) == 0):
        raise VitfoldError("OpenVINO int8 quantization needs calibration images")
    model = ov.convert_model(str(onnx_path))
    if precision == "int8":
        model = _quantize(model, calibration)
    for key, value in (metadata or {}).items():
        model.set_rt_info(value, [MODEL_INFO, key])
    model.set_rt_info(precision, list(IR_PRECISION))
    model.set_rt_info(PRECISION_HINTS[precision], list(RUNTIME_PRECISION))
    with staged_files(dst.parent) as tmp:
        ov.save_model(model, str(tmp / dst.name), compress_to_fp16=False)
    return [dst, dst.with_suffix(".bin")]
