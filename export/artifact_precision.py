"""The precision an artifact computes at, read from the artifact itself, never from its file name.

    ONNX         int8 when the graph quantizes (QuantizeLinear/DequantizeLinear, the integer and QLinear ops);
                 else fp16 (bf16) when a weight, a graph input or a graph output is float16 (bfloat16); else fp32
    AOTInductor  the precision vitfold's export records in the package's metadata (PRECISION_KEY); a package
                 that records none is taken as fp32
    TensorRT     the precision recorded beside the plan (model.json), else fp32
    TorchScript  fp32 (vitfold exports no reduced-precision TorchScript)

`artifact_precision` returns the precision and where it was read, for the report.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from vitfold.errors import VitfoldError

PRECISION_KEY = "vitfold.precision"  # AOTInductor package metadata (aot_inductor.metadata) written at export
QUANTIZED_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "MatMulInteger",
        "ConvInteger",
        "QLinearMatMul",
        "QLinearConv",
        "QGemm",
        "QAttention",
        "DynamicQuantizeMatMul",
    }
)


def onnx_precision(path: Path) -> str:
    """int8, fp16, bf16 or fp32 of the ONNX graph at `path` (see the module); weights are not read."""
    import onnx
    from onnx import TensorProto

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # not an ONNX file: the user's input
        raise VitfoldError(f"{path} is not a readable ONNX model ({type(e).__name__})") from None
    graph = model.graph
    if any(node.op_type in QUANTIZED_OPS for node in graph.node):
        return "int8"
    types = {t.data_type for t in graph.initializer}
    types |= {v.type.tensor_type.elem_type for v in (*graph.input, *graph.output)}
    if TensorProto.FLOAT16 in types:
        return "fp16"
    if TensorProto.BFLOAT16 in types:
        return "bf16"
    return "fp32"


def package_precision(path: Path) -> str | None:
    """The precision an AOTInductor package's metadata records (`PRECISION_KEY`), None when it records none."""
    with zipfile.ZipFile(path) as package:
        for name in package.namelist():
            if name.endswith("_metadata.json") and "/aotinductor/" in name:
                try:
                    recorded = json.loads(package.read(name))
                except ValueError:  # not the metadata this looks for
                    continue
                if isinstance(recorded, dict) and recorded.get(PRECISION_KEY):
                    return str(recorded[PRECISION_KEY])
    return None


def artifact_precision(path: Path) -> tuple[str, str]:
    """(precision, where it was read) of the artifact file at `path`."""
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return onnx_precision(path), "its graph"
    if suffix == ".pt2":
        try:
            recorded = package_precision(path)
        except (zipfile.BadZipFile, OSError):
            raise VitfoldError(f"{path} is not an AOTInductor package (not a readable zip archive)") from None
        return (recorded, "its package metadata") if recorded else ("fp32", "no precision in its package: fp32")
    if suffix in (".plan", ".engine") and path.with_suffix(".json").is_file():
        return json.loads(path.with_suffix(".json").read_text()).get("precision", "fp32"), path.with_suffix(
            ".json"
        ).name
    return "fp32", "fp32 (the runtime's only precision here)"
