"""A Triton Inference Server model repository for the exported artifacts.

    <repo>/<name>_<artifact>/config.pbtxt
    <repo>/<name>_<artifact>/labels.txt      line i names output i (the output's `label_filename`)
    <repo>/<name>_<artifact>/1/model.onnx | model.plan | model.pt   (+ model.onnx.data when external)
    <repo>/<name>_<artifact>/1/model.xml + model.bin                 (OpenVINO IR, any precision)

One model per artifact, so a user can serve and compare them side by side: `<name>_onnx`,
`<name>_onnx_fp16`, `<name>_onnx_int8`, `<name>_torchscript`, `<name>_tensorrt` (`_tensorrt_fp16`, ...
for a plan built at a reduced precision), `<name>_openvino` (`_openvino_bf16`, `_openvino_int8`): Triton's
OpenVINO backend (`backend: "openvino"`, CPU instances, one stream, the LATENCY hint; `HINT_BF16` for the
bf16 IR, whose runtime info asks for bf16 too; the fp32 and int8 IRs ask for f32 in theirs, which OpenVINO
applies when it compiles them). The libtorch backend names tensors by position
(INPUT__0 / OUTPUT__0); ONNX and TensorRT use the exported names. Batch is the first, variable dimension
(`max_batch_size`), with dynamic batching on. A model folder that exists already is replaced only when
the caller says it may be (`replaceable`, or `force`); every folder is checked before any is written.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Collection
from pathlib import Path

from vitfold.errors import VitfoldError
from vitfold.export import FILES

PLATFORMS = {"onnx": "onnxruntime_onnx", "tensorrt": "tensorrt_plan", "torchscript": "pytorch_libtorch"}
BACKENDS = {"openvino": "openvino"}  # formats served by a backend rather than a platform
CPU_ONLY = ("openvino",)  # formats whose Triton backend runs CPU instances only
# artifact -> the OpenVINO backend's parameters (its CPU plugin settings)
OPENVINO_PARAMETERS = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}
OPENVINO_BF16 = {"HINT_BF16": "YES"}
LABELS = "labels.txt"
MODEL_NAME = re.compile(r"[A-Za-z0-9_.\-]+")  # a model name that is also a plain folder name


def _tensor(name: str, dims: tuple[int, ...], labels: bool = False) -> str:
    label = f'\n    label_filename: "{LABELS}"' if labels else ""
    return f'  {{\n    name: "{name}"\n    data_type: TYPE_FP32\n    dims: [ {", ".join(map(str, dims))} ]{label}\n  }}'


def _parameters(parameters: dict[str, str]) -> str:
    return "".join(f'parameters: {{ key: "{k}" value: {{ string_value: "{v}" }} }}\n' for k, v in parameters.items())


def openvino_parameters(artifact: str) -> dict[str, str]:
    """The Triton OpenVINO backend's parameters for an IR artifact (`openvino`, `openvino-bf16`, ...)."""
    return {**OPENVINO_PARAMETERS, **(OPENVINO_BF16 if artifact.endswith("-bf16") else {})}


def model_config(
    name: str,
    fmt: str,
    input_name: str,
    output_name: str,
    image_shape: tuple[int, ...],
    num_classes: int,
    max_batch_size: int,
    labels: bool = False,
    parameters: dict[str, str] | None = None,
) -> str:
    """config.pbtxt text for one model (inputs and outputs stay FP32 at every precision); with `labels`,
    the output names its label file; `parameters`: the backend's settings."""
    if fmt == "torchscript":
        input_name, output_name = "INPUT__0", "OUTPUT__0"
    runtime = f'backend: "{BACKENDS[fmt]}"' if fmt in BACKENDS else f'platform: "{PLATFORMS[fmt]}"'
    return (
        f'name: "{name}"\n{runtime}\nmax_batch_size: {max_batch_size}\n'
        f"input [\n{_tensor(input_name, image_shape)}\n]\n"
        f"output [\n{_tensor(output_name, (num_classes,), labels)}\n]\n"
        "dynamic_batching { }\n"
        f"instance_group [ {{ count: 1{', kind: KIND_CPU' if fmt in CPU_ONLY else ''} }} ]\n"
        + _parameters(parameters or {})
    )


def model_names(model_name: str, artifacts: Collection[str]) -> dict[str, str]:
    """artifact (`onnx`, `onnx-fp16`, `tensorrt-int8`, ...) -> its Triton model name `<model_name>_<artifact>`."""
    if not MODEL_NAME.fullmatch(model_name) or model_name in (".", ".."):
        raise VitfoldError("use letters, digits, '_', '-' and '.'", argument="model_name", value=model_name)
    return {artifact: f"{model_name}_{artifact.replace('-', '_')}" for artifact in artifacts}


def check_repository(
    repo_dir: Path, names: Collection[str], replaceable: Collection[str] = (), force: bool = False
) -> None:
    """Refuse (one line) a model folder `names` would replace: one that exists and is not `replaceable`,
    unless `force`; and, even with `force`, one that is not a real folder (a symbolic link: replacing it
    would write through it, or fail half-way)."""
    for name in names:
        folder = repo_dir / name
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            kind = f"a symbolic link to {os.readlink(folder)}" if folder.is_symlink() else "not a folder"
            raise VitfoldError(f"Triton model folder {folder} is {kind}: remove it, or choose another --triton")
    taken = [n for n in names if (repo_dir / n).exists() and n not in replaceable]
    if taken and not force:
        raise VitfoldError(f"Triton model folder {repo_dir / taken[0]} exists already: pass --force to replace it")


def write_triton_repository(
    repo_dir: Path,
    artifacts: dict[str, Path],
    *,
    model_name: str,
    input_name: str,
    output_name: str,
    image_shape: tuple[int, ...],
    num_classes: int,
    max_batch_size: int = 32,
    labels: str | None = None,
    replaceable: Collection[str] = (),
    force: bool = False,
) -> list[Path]:
    """Write one model directory per artifact (artifact -> file; its format is the name before any
    `-<precision>`); returns the config.pbtxt paths. `labels`: the text of labels.txt (line i names
    output i). An existing model folder is replaced only if its name is in `replaceable` or with `force`.

    Each model directory is assembled in a temp directory and renamed into place whole."""
    names = model_names(model_name, artifacts)
    check_repository(repo_dir, names.values(), replaceable, force)
    repo_dir.mkdir(parents=True, exist_ok=True)
    configs = []
    for artifact, src in sorted(artifacts.items()):
        name, fmt = names[artifact], artifact.split("-")[0]
        tmp = Path(tempfile.mkdtemp(dir=repo_dir, prefix=f".{name}-"))
        try:
            version = tmp / "1"
            version.mkdir()
            shutil.copy2(src, version / FILES[fmt])
            data = src.with_name(src.name + ".data")
            if fmt == "onnx" and data.is_file():  # external weights keep their recorded relative name
                shutil.copy2(data, version / data.name)
            if fmt == "openvino":  # the IR's weights, under the name the backend reads beside model.xml
                shutil.copy2(src.with_suffix(".bin"), (version / FILES[fmt]).with_suffix(".bin"))
            parameters = openvino_parameters(artifact) if fmt == "openvino" else None
            config = model_config(
                name,
                fmt,
                input_name,
                output_name,
                image_shape,
                num_classes,
                max_batch_size,
                labels is not None,
                parameters,
            )
            (tmp / "config.pbtxt").write_text(f"# vitfold export: {artifact}\n{config}")
            if labels is not None:
                (tmp / LABELS).write_text(labels)
            final = repo_dir / name
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        configs.append(repo_dir / name / "config.pbtxt")
    return configs
