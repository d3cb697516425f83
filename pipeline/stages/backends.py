"""The backends of a run: names for what verify and bench compare, each a runtime on a model or a file
of the run.

    torch-unmerged    base backbone + trained adapter (the reference)    train/adapter.safetensors
    torch-folded      fold/model.safetensors loaded by timm alone
    torch-base        the plain base architecture (latency baseline; weights do not matter)
    torch-folded-fp16 torch-folded with its weights cast to fp16 (CUDA), -bf16 to bf16 (bench rows)
    torchscript       export/model.pt        onnxruntime       export/model.onnx
    aoti              export/model.pt2       onnxruntime-fp16  export/model.fp16.onnx
    aoti-fp16         export/model.fp16.pt2  onnxruntime-int8  export/model.int8.onnx
    aoti-bf16         export/model.bf16.pt2  tensorrt          export/model.plan
    openvino          export/model.xml       openvino-bf16     export/model.bf16.xml
    openvino-int8     export/model.int8.xml  (each with its .bin; OpenVINO's CPU plugin)

A backend named `<...>-<precision>` computes at that precision; tensorrt at the one its plan records.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from vitfold.errors import VitfoldError
from vitfold.export import PRECISIONS
from vitfold.export.isa import cpu_has_bf16
from vitfold.export.precision import at_precision
from vitfold.export.runners import EXECUTABLE_RUNTIMES, Runner, open_hashed, open_runner, unavailable
from vitfold.names import (
    ARTIFACT_BACKENDS,
    BACKENDS,
    BASE,
    FOLDED,
    FOLDED_BF16,
    FOLDED_FP16,
    UNMERGED,
)
from vitfold.pipeline.stages.manifest import read_manifest, recorded_outputs, verified_input
from vitfold.pipeline.stages.rundir import RunDir
from vitfold.pipeline.stages.trust import require_trusted


def unmerged_model(rd: RunDir) -> nn.Module:
    """The base backbone with the trained adapter attached, exactly as training evaluated it."""
    from vitfold.pipeline.adapting import load_adapter
    from vitfold.pipeline.models import build_model

    path = verified_input(rd, rd.adapter, "train")
    return load_adapter(build_model(rd.config, rd.num_classes), rd.tensors(path)).eval()


def folded_model(rd: RunDir) -> nn.Module:
    """fold/model.safetensors as a plain timm model, loaded by timm alone (the call the fold stage records)."""
    from vitfold.pipeline.backbones import load_folded

    cfg = rd.config
    path = verified_input(rd, rd.folded, "fold")
    return load_folded(path, cfg.backbone, int(rd.metadata(path)["num_classes"]), cfg.backbone_kwargs)


def base_model(rd: RunDir) -> nn.Module:
    """The plain base architecture with the run's head size and no adapter."""
    import timm

    cfg = rd.config
    num_classes = int(rd.metadata(rd.folded)["num_classes"])
    return timm.create_model(cfg.backbone, num_classes=num_classes, **cfg.backbone_kwargs).eval()


MODELS = {
    UNMERGED: unmerged_model,
    FOLDED: folded_model,
    BASE: base_model,
    FOLDED_FP16: lambda rd: at_precision(folded_model(rd), "fp16"),
    FOLDED_BF16: lambda rd: at_precision(folded_model(rd), "bf16"),
}
REDUCED = tuple(name for name in BACKENDS if name.rsplit("-", 1)[-1] in PRECISIONS)  # optional extras


def backend_files(rd: RunDir, name: str) -> list[Path]:
    """The files of the run that backend `name` reads (an ONNX file's `.data` beside it, when there is one;
    an IR's `.bin`)."""
    if name == UNMERGED:
        return [rd.adapter]
    if name in (FOLDED, BASE, FOLDED_FP16, FOLDED_BF16):
        return [rd.folded]
    path = rd.artifact(ARTIFACT_BACKENDS[name][1])
    if path.suffix == ".xml":
        return [path, path.with_suffix(".bin")]
    return [path, path.with_name(path.name + ".data")] if path.suffix == ".onnx" else [path]


def recorded_artifacts(rd: RunDir) -> dict[str, Path]:
    """Backend -> its artifact file, for every artifact the export stage recorded."""
    recorded = set(recorded_outputs(rd, "export"))
    files = {name: rd.artifact(fmt) for name, (_, fmt) in ARTIFACT_BACKENDS.items()}
    return {name: path for name, path in files.items() if path in recorded}


def default_backends(rd: RunDir, names: tuple[str, ...]) -> list[str]:
    """`names`, less the reduced-precision artifacts this run did not export (an option, not a missing
    artifact) and the reduced-precision torch rows this machine cannot compute natively."""
    return [n for n in names if n not in REDUCED or _reduced_available(rd, n)]


def _reduced_available(rd: RunDir, name: str) -> bool:
    if name in ARTIFACT_BACKENDS:
        return rd.artifact(ARTIFACT_BACKENDS[name][1]).is_file()
    return name == FOLDED_BF16 and cpu_has_bf16() or name == FOLDED_FP16 and torch.cuda.is_available()


def backend_unavailable(rd: RunDir, name: str, device: str) -> str | None:
    """Why backend `name` cannot run on `device` for this run (None when it can)."""
    if name not in BACKENDS:
        return f"unknown backend '{name}' (choose from {', '.join(BACKENDS)})"
    runtime, fmt = ARTIFACT_BACKENDS.get(name, ("torch", None))
    reason = unavailable(runtime, device) or _precision_unavailable(name, device)
    if reason is None and fmt is not None and not rd.artifact(fmt).is_file():
        if rd.artifact(fmt) in recorded_outputs(rd, "export"):  # exported, then lost: fail closed
            raise VitfoldError(f"{rd.artifact(fmt)} is missing, though the export stage recorded it: rerun the export")
        reason = f"export/{rd.artifact(fmt).name} not built (vitfold export --format ...)"
    return reason


def _precision_unavailable(name: str, device: str) -> str | None:
    """Why the torch row of a reduced precision cannot run natively on `device` (None when it can)."""
    cpu = torch.device(device).type == "cpu"
    if name == FOLDED_FP16 and cpu:
        return "fp16 torch rows run on CUDA (CPUs have no fast fp16 matmul)"
    if name == FOLDED_BF16 and cpu and not cpu_has_bf16():
        return "this CPU has no native bf16 (AVX512_BF16 or AMX)"
    return None


def open_backend(
    rd: RunDir,
    name: str,
    device: str = "cpu",
    threads: int | None = None,
    trust: bool = False,
    spin: bool | None = None,
) -> Runner:
    """Open backend `name` of the run. Refused: an artifact the export stage did not record, or whose
    sha256 differs from the one it recorded, and one that runs code but was not written here (`trust`).
    An artifact that runs code is loaded from a private copy hashed again (`open_hashed`): the run's cached
    hashes are never the only check before native code is loaded. `spin`: whether ONNX Runtime's idle threads
    spin (None: its default)."""
    if name in MODELS:
        return open_runner("torch", MODELS[name](rd), device)
    runtime = ARTIFACT_BACKENDS[name][0]
    path = checked_artifact(rd, name, trust)
    if runtime not in EXECUTABLE_RUNTIMES:
        return open_runner(runtime, path, device, threads, spin)
    recorded = read_manifest(rd)["stages"]["export"]["outputs"][rd.key(path)]

    def check(digest: str) -> None:
        if digest != recorded:
            raise VitfoldError(f"{path} changed since it was checked (sha256 {digest[:16]}…): refusing to load it")
        require_trusted(path, digest, trust)

    return open_hashed(runtime, path, check, device, threads)


def check_backend(rd: RunDir, name: str, trust: bool = False) -> None:
    """Refuse backend `name` (exit 2) when a file it reads differs from the sha256 its stage recorded (an
    artifact also when that stage did not record it, or it runs code and is not trusted), as verify does."""
    if name in ARTIFACT_BACKENDS:
        checked_artifact(rd, name, trust)
    else:
        verified_input(rd, *((rd.adapter, "train") if name == UNMERGED else (rd.folded, "fold")))


def checked_artifact(rd: RunDir, name: str, trust: bool = False, hint: str = "") -> Path:
    """The artifact file of backend `name`, after the integrity and trust checks of `open_backend` (`hint`
    ends the message of an integrity refusal)."""
    fmt = ARTIFACT_BACKENDS[name][1]
    path = verified_input(rd, rd.artifact(fmt), "export", recorded_only=True, hint=hint)
    if path.suffix == ".xml":  # the IR's weights are its .bin: checked like the file that names them
        verified_input(rd, path.with_suffix(".bin"), "export", recorded_only=True, hint=hint)
    if ARTIFACT_BACKENDS[name][0] in EXECUTABLE_RUNTIMES:
        require_trusted(path, rd.sha256(path), trust)
    return path


def backend_precision(rd: RunDir, name: str) -> str:
    """The precision a `<...>-<precision>` backend names, the one a TensorRT plan records, else fp32."""
    if name in REDUCED:
        return name.rsplit("-", 1)[-1]
    info = rd.artifact("tensorrt").with_suffix(".json")
    if name == "tensorrt" and info.is_file():
        return json.loads(info.read_text()).get("precision", "fp32")
    return "fp32"
