"""ONNX export with the dynamo exporter: dynamic batch, opset >= 17, full checker, external data.

The exported module is the evaluated one (timm's fused attention stays on; the exporter lowers
`scaled_dot_product_attention` to MatMul-Softmax-MatMul, and verify measures the result). Opset >= 17
keeps LayerNorm as one `LayerNormalization` op. `metadata` (the preprocessing and class names,
`ModelInfo.metadata_props`) becomes the model's `metadata_props`. Weights go into the `.onnx` file when the model fits
under protobuf's 2 GB limit, else into `<name>.onnx.data` beside it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from vitfold.errors import VitfoldError
from vitfold.export.artifacts import INPUT_NAME, OUTPUT_NAME, batch_dim, example_input, staged_files

MIN_OPSET = 17
SINGLE_FILE_LIMIT = 1_800_000_000  # bytes of weights; protobuf refuses messages over 2 GB


def export_onnx(
    model: nn.Module,
    path: Path,
    image_size: tuple[int, int],
    opset: int = 18,
    metadata: dict[str, str] | None = None,
) -> list[Path]:
    """Write `path` (and its `.data` file when needed) atomically, with `metadata` as the model's
    `metadata_props`; returns the files written, `path` first."""
    import onnx

    if opset < MIN_OPSET:
        raise VitfoldError(f"use {MIN_OPSET} or newer (LayerNormalization as one op)", argument="opset", value=opset)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    external = weight_bytes > SINGLE_FILE_LIMIT
    with staged_files(path.parent) as tmp:
        target = tmp / path.name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model.eval(),
                (example_input(image_size),),
                str(target),
                dynamo=True,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=(batch_dim(),),
                external_data=external,
                verbose=False,
            )
        if metadata:
            proto = onnx.load(str(target), load_external_data=False)  # the graph; weights stay where they are
            onnx.helper.set_model_props(proto, metadata)
            onnx.save(proto, str(target))
        onnx.checker.check_model(str(target), full_check=True)
        extra = sorted(path.parent / p.name for p in tmp.iterdir() if p.is_file() and p.name != path.name)
    return [path, *extra]
