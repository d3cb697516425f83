"""The export stage: RUN/fold/model.safetensors -> RUN/export/ artifacts (+ a Triton repository).

The folded model is loaded with timm alone (the call the fold stage records), so every artifact is the
plain base architecture; `vitfold.export.export` writes the files. RUN/export/export.json records the
precision, input size, tensor names and, per artifact, its files, bytes and seconds.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitfold.export import FILES
from vitfold.export.artifacts import INPUT_NAME, OUTPUT_NAME
from vitfold.export.exporting import check_formats, export
from vitfold.pipeline.atomic import atomic_write_json
from vitfold.pipeline.config import ExportConfig
from vitfold.pipeline.data import build_splits, parse_data_spec
from vitfold.pipeline.models import data_transform
from vitfold.pipeline.stages.backends import folded_model
from vitfold.pipeline.stages.manifest import recorded_outputs
from vitfold.pipeline.stages.rundir import RunDir
from vitfold.pipeline.stages.stage import Context, Stage, StageResult
from vitfold.pipeline.stages.trust import EXECUTABLE_FORMATS, remember

TRITON_FORMATS = ("onnx", "torchscript", "tensorrt")


CALIBRATION_SEED = 0


def calibration_images(rd: RunDir, model: nn.Module, samples: int, seed: int = CALIBRATION_SEED) -> torch.Tensor:
    """A seeded choice of `samples` training images (n, 3, H, W) as `model` reads them (never flipped; a
    random crop, for FGVC data, drawn from the same seed, so the calibration is the same every time)."""
    transform = replace(data_transform(rd.config, model), hflip=False)
    train = build_splits(parse_data_spec(rd.config.data), transform).train
    picks = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:samples].tolist()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return torch.stack([train[i][0] for i in picks])


def _run(rd: RunDir, settings: ExportConfig, ctx: Context) -> StageResult:
    formats = check_formats(settings.formats, settings.precision, settings.device)  # before any work
    model = folded_model(rd)
    size = tuple(int(s) for s in model.patch_embed.img_size)
    artifacts: dict[str, dict[str, Any]] = {}
    int8 = settings.precision == "int8"
    calibration = None
    if int8 and settings.int8_mode == "static":
        calibration = calibration_images(rd, model, settings.calibration_samples)
        ctx.log(f"int8: calibrating on {len(calibration)} training images (seed {CALIBRATION_SEED})")

    def done(name: str, files: list[Path], seconds: float) -> None:
        artifacts[name] = {
            "files": [rd.key(f) for f in files],
            "bytes": sum(f.stat().st_size for f in files),
            "seconds": round(seconds, 3),
        }
        ctx.log(
            f"{name}: {', '.join(f.name for f in files)} ({artifacts[name]['bytes'] / 1e6:.1f} MB, {seconds:.1f} s)"
        )

    written = export(
        model,
        rd.export_dir,
        formats,
        (3, *size),
        settings.precision,
        settings.opset,
        device=settings.device,
        calibration=calibration,
        int8_mode=settings.int8_mode,
        quantize_head=settings.int8_head,
        on_artifact=done,
    )
    summary = {
        "precision": settings.precision,
        "opset": settings.opset,
        "image_size": list(size),
        "num_classes": model.num_classes,
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "artifacts": artifacts,
    }
    if int8:
        summary["int8"] = {
            "mode": settings.int8_mode,
            "format": "QDQ" if settings.int8_mode == "static" else "dynamic",
            "quantize_head": settings.int8_head,
            "calibration": None
            if calibration is None
            else {"split": "train", "images": len(calibration), "seed": CALIBRATION_SEED},
        }
    if settings.triton:
        from vitfold.export.triton import write_triton_repository

        served = {fmt: written[fmt] for fmt in TRITON_FORMATS if fmt in written}
        if "onnx-fp16" in written:
            served["onnx"] = written["onnx-fp16"]
        configs = write_triton_repository(
            Path(settings.triton),
            served,
            model_name=rd.config.backbone.split(".")[0],
            input_name=INPUT_NAME,
            output_name=OUTPUT_NAME,
            image_shape=(3, *size),
            num_classes=model.num_classes,
            precision=settings.precision,
        )
        summary["triton"] = [str(c) for c in configs]
        ctx.log(f"triton repository: {settings.triton}")
    atomic_write_json(rd.export_summary, summary)
    outputs = [rd.path / f for a in artifacts.values() for f in a["files"]]
    for fmt in EXECUTABLE_FORMATS:
        if fmt in written:
            remember(rd.sha256(written[fmt]))
    for old in _artifact_files(rd) - set(outputs):  # a format not built this time leaves nothing behind
        old.unlink(missing_ok=True)
        ctx.log(f"removed {rd.key(old)} (not built by this export)")
    return StageResult(outputs, value=summary, extra={"formats": formats, "precision": settings.precision})


def _artifact_files(rd: RunDir) -> set[Path]:
    """Every artifact file an export may have left in RUN/export/ (recorded or not)."""
    main = [rd.artifact(fmt) for fmt in FILES]
    companions = [rd.artifact("onnx").with_name(FILES["onnx"] + ".data"), rd.artifact("tensorrt").with_suffix(".json")]
    return {p for p in [*main, *companions, *recorded_outputs(rd, "export")] if p.is_file()}


EXPORT = Stage("export", section="export", inputs=lambda rd, s: [rd.folded], run=_run)
