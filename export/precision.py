"""What each precision means for each format: the artifact it adds, where it can run, and how a torch
model computes at it.

fp32 artifacts are always written; a reduced precision adds, for each requested format that has one, a
variant beside the fp32 artifact (`VARIANTS`), e.g. `--format onnx --precision int8` writes model.onnx
and model.int8.onnx. A TensorRT plan is built once, at the precision asked for.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from vitfold.errors import VitfoldError
from vitfold.export import PRECISIONS
from vitfold.export.isa import cpu_has_bf16, cpu_isa

# precision -> {format: the artifact (a key of FILES) that precision writes for it}
VARIANTS: dict[str, dict[str, str]] = {
    "fp32": {},
    "fp16": {"onnx": "onnx-fp16", "aoti": "aoti-fp16", "tensorrt": "tensorrt"},
    "bf16": {"aoti": "aoti-bf16", "openvino": "openvino-bf16"},
    "int8": {"onnx": "onnx-int8", "tensorrt": "tensorrt", "openvino": "openvino-int8"},
}
# (precision, format) -> the only device type it is built for (fp16 kernels on CPUs are slower than fp32)
DEVICE_ONLY = {("fp16", "aoti"): "cuda"}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def variants(formats: list[str], precision: str, device: str = "cpu") -> dict[str, str]:
    """format -> reduced-precision artifact for the requested `formats` (one-line error when none applies)."""
    if precision not in PRECISIONS:
        raise VitfoldError(f"use {', '.join(PRECISIONS)}", argument="precision", value=precision)
    kind = torch.device(device).type
    found = {
        fmt: artifact
        for fmt, artifact in VARIANTS[precision].items()
        if fmt in formats and DEVICE_ONLY.get((precision, fmt), kind) == kind
    }
    if precision != "fp32" and not found:
        where = ", ".join(
            f"{f} (device {DEVICE_ONLY[precision, f]})" if (precision, f) in DEVICE_ONLY else f
            for f in VARIANTS[precision]
        )
        raise VitfoldError(
            f"applies to {where}; not to {', '.join(formats)} on {device}", argument="precision", value=precision
        )
    if precision == "bf16" and kind == "cpu":
        require_cpu_bf16()
    return found


def require_cpu_bf16() -> None:
    """One-line refusal of BF16 on a CPU that would only emulate it."""
    if not cpu_has_bf16():
        raise VitfoldError(
            f"on CPU needs AVX512_BF16 or AMX; this CPU has {', '.join(cpu_isa()) or 'neither'}",
            argument="precision",
            value="bf16",
        )


class FloatIO(nn.Module):
    """`model` computing in `dtype`, read and answered in float32: x (B, 3, H, W) f32 -> logits (B, C) f32."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model, self.dtype = model.to(dtype), dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.dtype)).float()


def at_precision(model: nn.Module, precision: str) -> nn.Module:
    """`model` itself for fp32, else a `FloatIO` copy with its weights cast to the precision's dtype."""
    if precision == "fp32":
        return model
    return FloatIO(copy.deepcopy(model), DTYPES[precision]).eval()
