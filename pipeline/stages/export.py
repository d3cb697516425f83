"""The export stage: RUN/fold/model.safetensors -> RUN/export/ artifacts (+ a Triton repository).

The folded model is loaded with timm alone (the call the fold stage records), so every artifact is the
plain base architecture; `vitfold.export.export` writes the files. The preprocessing and class names
that the fold stage wrote into fold/config.json travel with every artifact: RUN/export/export.json
records them with the precision, input size, tensor names and, per artifact, its files, bytes and
seconds; the ONNX files carry them as metadata_props, the OpenVINO IRs as runtime info (`model_info/`),
the Triton models as labels.txt. INT8 artifacts of both quantizers (ONNX Runtime's QDQ, NNCF's OpenVINO
IR) are calibrated on the same seeded training images.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitfold.errors import VitfoldError
from vitfold.export import FILES
from vitfold.export.artifacts import INPUT_NAME, OUTPUT_NAME
from vitfold.export.exporting import check_formats, export
from vitfold.export.model_info import ModelInfo
from vitfold.export.precision import variants
from vitfold.export.runners import EXECUTABLE_RUNTIMES, runtime_of
from vitfold.pipeline.atomic import atomic_write_json
from vitfold.pipeline.config import ExportConfig
from vitfold.pipeline.data import build_splits, parse_data_spec
from vitfold.pipeline.models import data_transform
from vitfold.pipeline.stages.backends import folded_model
from vitfold.pipeline.stages.manifest import read_manifest, recorded_outputs, verified_input
from vitfold.pipeline.stages.rundir import RunDir
from vitfold.pipeline.stages.stage import Context, Stage, StageResult
from vitfold.pipeline.stages.trust import remember

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


def model_info(rd: RunDir) -> ModelInfo:
    """The preprocessing and class names the fold stage recorded in fold/config.json."""
    if rd.folded.is_file() and not rd.folded_config.is_file():
        raise VitfoldError(f"{rd.folded_config} not found (folded by an older vitfold): vitfold run --force fold")
    path = verified_input(rd, rd.folded_config, "fold")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise VitfoldError(f"cannot read {path}: {e}") from None
    return ModelInfo.from_timm_config(config, str(path))


def _triton_artifacts(formats: list[str], precision: str, device: str) -> dict[str, str]:
    """Triton model key (`onnx`, `onnx-fp16`, `onnx-int8`, `torchscript`, `tensorrt[-<precision>]`,
    `openvino`, `openvino-bf16`, `openvino-int8`) -> the export artifact it serves, for the requested formats."""
    reduced = variants(formats, precision, device)
    served = {fmt: fmt for fmt in ("onnx", "torchscript", "openvino") if fmt in formats}
    for fmt in ("onnx", "openvino"):
        if fmt in reduced:
            served[reduced[fmt]] = reduced[fmt]
    if "tensorrt" in formats:
        served["tensorrt" if precision == "fp32" else f"tensorrt-{precision}"] = "tensorrt"
    return served


def _triton_written_before(rd: RunDir, repo: Path) -> set[str]:
    """The model folders in `repo` that this run's last recorded export wrote (replaced without --force)."""
    if not rd.export_summary.is_file():
        return set()
    try:
        configs = json.loads(rd.export_summary.read_text()).get("triton") or []
    except (OSError, ValueError, AttributeError):
        return set()
    return {Path(c).parent.name for c in configs if Path(c).parent.parent.resolve() == repo.resolve()}


@dataclass(frozen=True)
class TritonPlan:
    repo: Path
    served: dict[str, str]  # Triton model key -> the export artifact it serves
    name: str  # the models' name prefix
    max_batch: int
    replaceable: set[str]  # model folders this run's last export wrote


def _triton_plan(rd: RunDir, settings: ExportConfig, formats: list[str]) -> TritonPlan | None:
    """The Triton repository's settings, checked before any work (None: no repository asked for)."""
    if not settings.triton:
        return None
    from vitfold.export.tensorrt import PROFILE_BATCH
    from vitfold.export.triton import check_repository, model_names

    repo = Path(settings.triton)
    served = _triton_artifacts(formats, settings.precision, settings.device)
    name = settings.triton_name or rd.config.backbone.split(".")[0]
    max_batch = settings.triton_max_batch or max(rd.config.verify.batch_sizes)
    if "tensorrt" in formats and max_batch > PROFILE_BATCH[-1]:
        raise VitfoldError(
            f"--max-batch {max_batch}: the TensorRT plan's profile ends at batch {PROFILE_BATCH[-1]}; use at most that"
        )
    own = _triton_written_before(rd, repo)
    check_repository(repo, model_names(name, served).values(), own, settings.triton_force)
    return TritonPlan(repo, served, name, max_batch, own)


def _run(rd: RunDir, settings: ExportConfig, ctx: Context) -> StageResult:
    formats = check_formats(settings.formats, settings.precision, settings.device)  # before any work
    triton = _triton_plan(rd, settings, formats)
    info = model_info(rd)
    model = folded_model(rd)
    size = tuple(int(s) for s in model.patch_embed.img_size)
    artifacts: dict[str, dict[str, Any]] = {}
    int8 = settings.precision == "int8"
    calibration = None
    if int8 and (settings.int8_mode == "static" or "openvino" in formats):
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

    def starting(name: str) -> None:
        if name.startswith("aoti"):
            ctx.log(f"{name}: compiling the AOTInductor package (C++; minutes for a ViT-B on a CPU)...")

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
        info=info,
        on_artifact=done,
        on_start=starting,
    )
    summary = {
        "precision": settings.precision,
        "opset": settings.opset,
        "image_size": list(size),
        "num_classes": model.num_classes,
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        **info.to_dict(),
        "artifacts": artifacts,
    }
    if int8:
        summary["int8"] = _int8_summary(settings, written, calibration)
    if triton is not None:
        configs = _write_repository(triton, written, info, size, model.num_classes, settings.triton_force)
        summary["triton"] = [str(c) for c in configs]
        ctx.log(f"triton repository: {triton.repo} ({', '.join(c.parent.name for c in configs)})")
    atomic_write_json(rd.export_summary, summary)
    outputs = [rd.path / f for a in artifacts.values() for f in a["files"]]
    for path in written.values():  # every artifact that runs code, reduced-precision variants included
        if runtime_of(path) in EXECUTABLE_RUNTIMES:
            remember(rd.sha256(path))
    for old in _artifact_files(rd) - set(outputs):  # a format not built this time leaves nothing behind
        old.unlink(missing_ok=True)
        ctx.log(f"removed {rd.key(old)} (not built by this export)")
    return StageResult(outputs, value=summary, extra={"formats": formats, "precision": settings.precision})


def _int8_summary(settings: ExportConfig, written: dict[str, Path], calibration: torch.Tensor | None) -> dict:
    """export.json's `int8`: the calibration images, ONNX Runtime's quantization (when its INT8 ONNX was
    written) and NNCF's (`openvino`, when the INT8 IR was)."""
    found: dict[str, Any] = {
        "calibration": None
        if calibration is None
        else {"split": "train", "images": len(calibration), "seed": CALIBRATION_SEED},
    }
    if "onnx-int8" in written:
        found |= {
            "mode": settings.int8_mode,
            "format": "QDQ" if settings.int8_mode == "static" else "dynamic",
            "quantize_head": settings.int8_head,
        }
    if "openvino-int8" in written:
        from vitfold.export.openvino import int8_settings

        found["openvino"] = int8_settings(len(calibration))
    return found


def _write_repository(
    triton: TritonPlan, written: dict[str, Path], info: ModelInfo, size: tuple[int, ...], classes: int, force: bool
) -> list[Path]:
    from vitfold.export.triton import write_triton_repository

    return write_triton_repository(
        triton.repo,
        {key: written[artifact] for key, artifact in triton.served.items()},
        model_name=triton.name,
        input_name=INPUT_NAME,
        output_name=OUTPUT_NAME,
        image_shape=(3, *size),
        num_classes=classes,
        max_batch_size=triton.max_batch,
        labels=info.labels_text(),
        replaceable=triton.replaceable,
        force=force,
    )


def triton_from_export(
    rd: RunDir, repo: str | Path, name: str | None = None, max_batch: int | None = None, force: bool = False
) -> list[Path]:
    """A Triton repository at `repo` from the artifacts the export stage recorded, each checked against the
    sha256 recorded for it, without exporting again: no artifact, and nothing the manifest records, changes,
    so a verified run stays verified. export.json notes the model folders written (so that the next call may
    replace them without `force`). Returns the config.pbtxt files."""
    entry = read_manifest(rd)["stages"].get("export")
    if entry is None or entry.get("status") != "done" or not rd.export_summary.is_file():
        raise VitfoldError(f"{rd.path}: no finished export to serve: run vitfold export first")
    summary = json.loads(rd.export_summary.read_text())
    settings = replace(
        rd.config.export,
        precision=summary["precision"],
        triton=str(repo),
        triton_name=name,
        triton_max_batch=max_batch,
        triton_force=force,
    )
    triton = _triton_plan(rd, settings, entry["formats"])
    assert triton is not None  # settings.triton is set
    written = {
        artifact: verified_input(rd, rd.artifact(artifact), "export", recorded_only=True)
        for artifact in triton.served.values()
    }
    configs = _write_repository(triton, written, model_info(rd), summary["image_size"], summary["num_classes"], force)
    atomic_write_json(rd.export_summary, {**summary, "triton": [str(c) for c in configs]})
    return configs


def _artifact_files(rd: RunDir) -> set[Path]:
    """Every artifact file an export may have left in RUN/export/ (recorded or not)."""
    main = [rd.artifact(fmt) for fmt in FILES]
    companions = [rd.artifact("onnx").with_name(FILES["onnx"] + ".data"), rd.artifact("tensorrt").with_suffix(".json")]
    companions += [rd.artifact(a).with_suffix(".bin") for a in FILES if a.startswith("openvino")]
    return {p for p in [*main, *companions, *recorded_outputs(rd, "export")] if p.is_file()}


def _params(settings: ExportConfig) -> dict[str, Any]:
    """The settings as recorded: `triton_force` allows a replacement, it changes no artifact."""
    return {k: v for k, v in asdict(settings).items() if k != "triton_force"}


def _check(rd: RunDir, settings: ExportConfig) -> None:
    check_formats(settings.formats, settings.precision, settings.device)


EXPORT = Stage(
    "export",
    section="export",
    inputs=lambda rd, s: [rd.folded, rd.folded_config],
    run=_run,
    params=_params,
    check=_check,
)
