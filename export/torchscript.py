"""TorchScript export: traced and frozen, loadable with `torch.jit.load` alone.

TorchScript is deprecated upstream (FutureWarning in torch 2.14); prefer the AOTInductor `.pt2` or ONNX.
It is kept for Triton's libtorch backend and older C++ deployments.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from vitfold.export.artifacts import example_input, staged_files


def export_torchscript(model: nn.Module, path: Path, image_size: tuple[int, int]) -> list[Path]:
    with staged_files(path.parent) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecation and tracer warnings are known; verify checks the output
        traced = torch.jit.trace(model.eval(), example_input(image_size), check_trace=False)
        frozen = torch.jit.freeze(traced)
        frozen.save(str(tmp / path.name))
    return [path]
