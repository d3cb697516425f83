"""A Triton Inference Server model repository for the exported artifacts.

    <repo>/<model>_<format>/config.pbtxt
    <repo>/<model>_<format>/1/model.onnx | model.plan | model.pt   (+ model.onnx.data when external)

One model per format, so a user can serve and compare them side by side. The libtorch backend names
tensors by position (INPUT__0 / OUTPUT__0); ONNX and TensorRT use the exported names. Batch is the
first, variable dimension (`max_batch_size`), with dynamic batching on.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from vitfold.export import FILES

PLATFORMS = {"onnx": "onnxruntime_onnx", "tensorrt": "tensorrt_plan", "torchscript": "pytorch_libtorch"}


def _tensor(name: str, dims: tuple[int, ...]) -> str:
    return f'  {{\n    name: "{name}"\n    data_type: TYPE_FP32\n    dims: [ {", ".join(map(str, dims))} ]\n  }}'


def model_config(
    name: str,
    fmt: str,
    input_name: str,
    output_name: str,
    image_shape: tuple[int, ...],
    num_classes: int,
    max_batch_size: int,
) -> str:
    """config.pbtxt text for one model (inputs and outputs stay FP32 at every precision)."""
    if fmt == "torchscript":
        input_name, output_name = "INPUT__0", "OUTPUT__0"
    return (
        f'name: "{name}"\nplatform: "{PLATFORMS[fmt]}"\nmax_batch_size: {max_batch_size}\n'
        f"input [\n{_tensor(input_name, image_shape)}\n]\n"
        f"output [\n{_tensor(output_name, (num_classes,))}\n]\n"
        "dynamic_batching { }\n"
        "instance_group [ { count: 1 } ]\n"
    )


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
    precision: str = "fp32",
) -> list[Path]:
    """Write one model directory per artifact (format -> file); returns the config.pbtxt paths.

    Each model directory is assembled in a temp directory and renamed into place whole."""
    repo_dir.mkdir(parents=True, exist_ok=True)
    configs = []
    for fmt, src in sorted(artifacts.items()):
        name = f"{model_name}_{fmt}"
        tmp = Path(tempfile.mkdtemp(dir=repo_dir, prefix=f".{name}-"))
        try:
            version = tmp / "1"
            version.mkdir()
            shutil.copy2(src, version / FILES[fmt])
            data = src.with_name(src.name + ".data")
            if fmt == "onnx" and data.is_file():  # external weights keep their recorded relative name
                shutil.copy2(data, version / data.name)
            config = model_config(name, fmt, input_name, output_name, image_shape, num_classes, max_batch_size)
            (tmp / "config.pbtxt").write_text(f"# vitfold export, precision {precision}\n{config}")
            final = repo_dir / name
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        configs.append(repo_dir / name / "config.pbtxt")
    return configs
