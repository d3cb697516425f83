"""torch.export + AOTInductor: a `.pt2` package with dynamic batch, for CPU (or CUDA on a GPU machine),
loaded with `torch._inductor.aoti_load_package`. Needs a C++ compiler at export time.

A reduced-precision package (fp16, bf16) holds the weights cast after the fold and computes in that
dtype as torch does (LayerNorm and softmax accumulate in float32 inside their kernels); its input and
output stay float32, so callers do not change with the precision.
"""

from __future__ import annotations

import json
import logging
import shutil
import zipfile
from pathlib import Path

import torch
from torch import nn

from vitfold.errors import VitfoldError
from vitfold.export.artifact_precision import PRECISION_KEY
from vitfold.export.artifacts import batch_dim, example_input, staged_files
from vitfold.export.precision import at_precision


def _not_the_cuda_runtime_warning(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("No CUDA runtime is found")


def quiet_cuda_runtime_warning() -> None:
    """On a machine without a GPU, drop torch's "No CUDA runtime is found, using CUDA_HOME=..." warning, which
    torch.utils.cpp_extension logs when AOTInductor first imports it (exporting or loading a package):
    nothing here needs CUDA. Its other messages, and the warning on a GPU machine, stay."""
    if not torch.cuda.is_available():
        logging.getLogger("torch.utils.cpp_extension").addFilter(_not_the_cuda_runtime_warning)


def require_compiler() -> None:
    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        raise VitfoldError("aoti export needs a C++ compiler (c++, g++ or clang++) on PATH")


def export_aoti(
    model: nn.Module, path: Path, image_size: tuple[int, int], device: str = "cpu", precision: str = "fp32"
) -> list[Path]:
    require_compiler()
    quiet_cuda_runtime_warning()
    model = at_precision(model.eval(), precision).to(device)
    example = example_input(image_size).to(device)
    with torch.no_grad():
        program = torch.export.export(model, (example,), dynamic_shapes=(batch_dim(),))
    with staged_files(path.parent) as tmp:
        torch._inductor.aoti_compile_and_package(
            program,
            package_path=str(tmp / path.name),
            inductor_configs={"aot_inductor.metadata": {PRECISION_KEY: precision}},  # artifact_precision reads it
        )
    return [path]


def package_cpu_isa(path: Path) -> str | None:
    """The CPU instruction set an AOTInductor package was compiled for, as it records it (AOTI_CPU_ISA in
    its metadata, e.g. "AVX512 AVX512_VNNI"); None for a CUDA package or one that records none."""
    with zipfile.ZipFile(path) as package:
        for name in package.namelist():
            if name.endswith("_metadata.json") and "/aotinductor/" in name:
                isa = json.loads(package.read(name)).get("AOTI_CPU_ISA")
                if isa:
                    return str(isa)
    return None
