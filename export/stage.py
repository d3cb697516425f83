"""The export stage: RUN/fold/model.safetensors -> RUN/export/ artifacts (+ a Triton repository).

The folded model is loaded with timm alone (the call the fold stage records), so every artifact is the
plain base architecture. Each format is checked for its dependencies before any work starts.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from export import FILES, FORMATS
from export.artifacts import INPUT_NAME, OUTPUT_NAME
from export.models import folded_model, run_config
from pipeline.errors import VitfoldError
from pipeline.manifest import record_stage
from pipeline.run import atomic_write_json


def parse_formats(text: str) -> list[str]:
    formats = [f.strip() for f in text.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise VitfoldError(f"--format: unknown format '{(unknown or [text])[0]}' (choose from {', '.join(FORMATS)})")
    return formats


def _check_available(formats: list[str]) -> None:
    """Fail before any work when a format's optional dependency or device is missing (exit 2)."""
    if "tensorrt" in formats:
        from export.tensorrt import require_tensorrt

        require_tensorrt()
    if "aoti" in formats:
        from export.aoti import require_compiler

        require_compiler()


def export_stage(
    run_dir: Path,
    formats: list[str],
    precision: str = "fp32",
    opset: int = 18,
    triton_dir: Path | None = None,
    device: str = "cpu",
    log=print,
) -> dict[str, Any]:
    """Export the folded model in each format into RUN/export/; record sizes and times."""
    if precision not in ("fp32", "fp16"):
        raise VitfoldError(f"--precision {precision}: use fp32 or fp16")
    if precision == "fp16" and not set(formats) & {"onnx", "tensorrt"}:
        raise VitfoldError("--precision fp16 applies to onnx and tensorrt")
    _check_available(formats)
    started = time.perf_counter()
    model, cfg = folded_model(run_dir), run_config(run_dir)
    num_classes = model.num_classes
    size = tuple(model.patch_embed.img_size)
    out_dir = run_dir / "export"
    artifacts: dict[str, dict[str, Any]] = {}

    def timed(name: str, fn, *args, **kwargs) -> list[Path]:
        t0 = time.perf_counter()
        files = fn(*args, **kwargs)
        artifacts[name] = {
            "files": [str(f.relative_to(run_dir)) for f in files],
            "bytes": sum(f.stat().st_size for f in files),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        log(f"{name}: {', '.join(f.name for f in files)} ({artifacts[name]['bytes'] / 1e6:.1f} MB, "
            f"{artifacts[name]['seconds']:.1f} s)")  # fmt: skip
        return files

    onnx_path = out_dir / FILES["onnx"]
    if "onnx" in formats or "tensorrt" in formats:
        from export.onnx import export_onnx

        timed("onnx", export_onnx, model, onnx_path, size, opset)
        if precision == "fp16":
            from export.fp16 import convert_onnx_fp16

            timed("onnx-fp16", lambda: [convert_onnx_fp16(onnx_path, out_dir / FILES["onnx-fp16"])])  # one file
    if "torchscript" in formats:
        from export.torchscript import export_torchscript

        timed("torchscript", export_torchscript, model, out_dir / FILES["torchscript"], size)
    if "aoti" in formats:
        from export.aoti import export_aoti

        timed("aoti", export_aoti, model, out_dir / FILES["aoti"], size, device)
    if "tensorrt" in formats:
        from export.tensorrt import build_engine

        def tensorrt(plan: Path) -> list[Path]:
            build_engine(onnx_path, plan, precision=precision)
            return [plan, plan.with_suffix(".json")]  # the engine and the GPU/TensorRT it is tied to

        timed("tensorrt", tensorrt, out_dir / FILES["tensorrt"])
    summary = {"precision": precision, "opset": opset, "image_size": list(size), "num_classes": num_classes,
               "input_name": INPUT_NAME, "output_name": OUTPUT_NAME, "artifacts": artifacts}  # fmt: skip
    if triton_dir is not None:
        from export.triton import write_triton_repository

        built = {fmt: out_dir / FILES[fmt] for fmt in ("onnx", "torchscript", "tensorrt") if fmt in artifacts}
        if "onnx-fp16" in artifacts:
            built["onnx"] = out_dir / FILES["onnx-fp16"]
        configs = write_triton_repository(
            triton_dir, built, model_name=cfg.backbone.split(".")[0], input_name=INPUT_NAME,
            output_name=OUTPUT_NAME, image_shape=(3, *size), num_classes=num_classes, precision=precision,
        )  # fmt: skip
        summary["triton"] = [str(c) for c in configs]
        log(f"triton repository: {triton_dir}")
    atomic_write_json(out_dir / "export.json", summary)
    outputs = [run_dir / f for a in artifacts.values() for f in a["files"]]
    record_stage(run_dir, "export", [run_dir / "fold" / "model.safetensors"], outputs, time.perf_counter() - started,
                 formats=formats, precision=precision)  # fmt: skip
    return summary
