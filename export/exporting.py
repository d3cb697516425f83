"""`export(model, out_dir, ...)`: write a model in each requested format, with no run directory.

Every format is checked for its dependencies and device before any work starts (one `VitfoldError`
naming what is missing), and every file is staged in a temp folder and renamed into place, so a failed
export leaves nothing finished-looking behind.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from vitfold.errors import VitfoldError, first_line
from vitfold.export import FILES, format_names
from vitfold.export.model_info import ModelInfo
from vitfold.export.precision import variants

# (format, the files it wrote, seconds): what `on_artifact` is told after each format
ArtifactCallback = Callable[[str, list[Path], float], None]


def check_formats(formats: Iterable[str], precision: str = "fp32", device: str = "cpu") -> list[str]:
    """The formats as a list, after checking names, precision, device and each one's dependencies (exit 2)."""
    formats = format_names(formats)
    variants(formats, precision, device)
    if "tensorrt" in formats:
        from vitfold.export.tensorrt import require_tensorrt

        require_tensorrt()
    if "openvino" in formats:
        from vitfold.export.openvino import require_openvino

        require_openvino(nncf=precision == "int8")
    if "aoti" in formats:
        from vitfold.export.aoti import require_compiler

        require_compiler()
        if device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise VitfoldError(
                    "the AOTInductor package for CUDA needs a GPU; none is visible", argument="device", value=device
                )
    return formats


def _image_size(input_size: tuple[int, ...]) -> tuple[int, int]:
    if len(input_size) != 3 or input_size[0] != 3 or min(input_size) < 1:
        raise VitfoldError("must be (3, H, W)", argument="input_size", value=tuple(input_size))
    return int(input_size[1]), int(input_size[2])


def check_model(model: nn.Module, input_size: tuple[int, int, int]) -> None:
    """One forward pass of a zero image of `input_size` before any exporter runs: a model that is not an
    `nn.Module`, or that refuses the size, is one `VitfoldError` instead of an exporter's traceback."""
    if not isinstance(model, nn.Module):
        raise VitfoldError(f"must be a torch.nn.Module, got {type(model).__name__}", argument="model")
    model.eval()
    try:
        with torch.no_grad():
            logits = model(torch.zeros(1, *input_size, device=next(model.parameters()).device))  # [1, classes]
    except (RuntimeError, AssertionError, ValueError, TypeError) as e:
        raise VitfoldError(
            f"the model does not run on (1, {', '.join(map(str, input_size))}) images: {first_line(e)}",
            argument="input_size",
            value=tuple(input_size),
        ) from None
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != 1:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise VitfoldError(f"must return logits [batch, classes], returned {shape}", argument="model")


def export(
    model: nn.Module,
    out_dir: str | Path,
    formats: Iterable[str] = ("onnx", "torchscript", "aoti"),
    input_size: tuple[int, int, int] = (3, 224, 224),
    precision: str = "fp32",
    opset: int = 18,
    *,
    device: str = "cpu",
    calibration: torch.Tensor | None = None,
    int8_mode: str = "static",
    quantize_head: bool = True,
    info: ModelInfo | None = None,
    on_artifact: ArtifactCallback | None = None,
    on_start: Callable[[str], None] | None = None,
) -> dict[str, Path]:
    """Export `model` (evaluated as it is: fold adapters first) into `out_dir`; returns artifact -> file.

    Formats: onnx, torchscript, aoti (a `.pt2` for `device`), tensorrt (built from the ONNX; needs the
    [trt] extra and a GPU), openvino (an IR read from the ONNX; the [openvino] extra). Each is written in
    fp32; `precision` adds its variants beside them (`vitfold.export.precision.VARIANTS`): onnx-fp16,
    onnx-int8 (static QDQ calibrated on `calibration`, (N, 3, H, W) normalised images, or
    `int8_mode="dynamic"`), aoti-fp16 (CUDA), aoti-bf16, openvino-bf16, openvino-int8 (NNCF, calibrated on
    the same images); the TensorRT plan is built at `precision`. tensorrt and openvino write the ONNX too.
    File names: `vitfold.export.FILES`. `info` (preprocessing and class names) goes into every ONNX file's
    metadata_props and every OpenVINO IR's runtime info. `on_start(artifact)` is called as each artifact
    begins, `on_artifact(artifact, files, seconds)` when it is written.
    """
    formats = check_formats(formats, precision, device)
    reduced = variants(formats, precision, device)
    image_size = _image_size(input_size)
    check_model(model, tuple(input_size))
    model = model.eval()
    if info is not None:
        info.check(tuple(input_size), model.num_classes)
    out_dir = Path(out_dir)
    written: dict[str, Path] = {}

    def produce(name: str, make: Callable[[], list[Path]]) -> None:
        if on_start is not None:
            on_start(name)
        started = time.perf_counter()
        try:
            files = make()
        except OSError as e:  # a full disk or a read-only folder: staged files are gone, one line says why
            raise VitfoldError(f"cannot write the {name} export into {out_dir}: {e.strerror or e}") from None
        written[name] = files[0]
        if on_artifact is not None:
            on_artifact(name, files, time.perf_counter() - started)

    onnx_path = out_dir / FILES["onnx"]
    metadata = info.metadata_props() if info is not None else None
    if {"onnx", "tensorrt", "openvino"} & set(formats):
        from vitfold.export.onnx import export_onnx

        produce("onnx", lambda: export_onnx(model, onnx_path, image_size, opset, metadata))
    if "onnx-fp16" in reduced.values():
        from vitfold.export.fp16 import convert_onnx_fp16

        produce("onnx-fp16", lambda: [convert_onnx_fp16(onnx_path, out_dir / FILES["onnx-fp16"])])
    if precision == "int8" and {"onnx", "tensorrt"} & set(formats):
        from vitfold.export.int8 import quantize_onnx_int8

        def quantize() -> list[Path]:
            dst = out_dir / FILES["onnx-int8"]
            return [quantize_onnx_int8(onnx_path, dst, calibration, mode=int8_mode, quantize_head=quantize_head)]

        produce("onnx-int8", quantize)
    if "torchscript" in formats:
        from vitfold.export.torchscript import export_torchscript

        produce("torchscript", lambda: export_torchscript(model, out_dir / FILES["torchscript"], image_size))
    if "aoti" in formats:
        from vitfold.export.aoti import export_aoti

        produce("aoti", lambda: export_aoti(model, out_dir / FILES["aoti"], image_size, device))
        if "aoti" in reduced:
            artifact = reduced["aoti"]
            produce(artifact, lambda: export_aoti(model, out_dir / FILES[artifact], image_size, device, precision))
    if "openvino" in formats:
        from vitfold.export.openvino import export_openvino

        produce("openvino", lambda: export_openvino(onnx_path, out_dir / FILES["openvino"], "fp32", metadata))
        if "openvino" in reduced:
            artifact = reduced["openvino"]
            ir = out_dir / FILES[artifact]
            produce(artifact, lambda: export_openvino(onnx_path, ir, precision, metadata, calibration))
    if "tensorrt" in formats:
        from vitfold.export.tensorrt import build_engine

        plan = out_dir / FILES["tensorrt"]
        source = written["onnx-int8"] if precision == "int8" else onnx_path  # int8: TensorRT reads the QDQ
        # the engine first, then the record of the GPU and TensorRT version it is tied to
        produce("tensorrt", lambda: [build_engine(source, plan, precision=precision), plan.with_suffix(".json")])
    return written
