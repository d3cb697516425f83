"""vitfold.export: exporters, runners, comparison and timing for any timm model and any artifact path.

    from vitfold.export import export, open_runner, compare
    files = export(model, "out/", formats=("onnx", "torchscript", "aoti"), input_size=(3, 224, 224))
    with open_runner("onnxruntime", files["onnx"]) as runner:
        ok = compare(reference_logits, runner(images))   # truthy when within tolerance; ok.to_dict()

Nothing here knows a run directory. Optional runtimes (onnxruntime-gpu, tensorrt, openvino) are imported lazily
inside the modules that need them, so `import vitfold.export` works without them, and importing this
package imports neither torch nor onnx.
"""

from collections.abc import Iterable
from importlib import import_module
from pathlib import Path
from typing import Any

FORMATS = ("onnx", "torchscript", "aoti", "tensorrt", "openvino")
DEFAULT_FORMATS = ("onnx", "torchscript", "aoti")  # tensorrt needs the [trt] extra and a GPU, openvino [openvino]
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
# the file of each artifact in the output folder; "<format>-<precision>" is a reduced-precision variant
# written beside the fp32 artifact of that format (see `exporting.VARIANTS`)
FILES = {
    "onnx": "model.onnx",
    "onnx-fp16": "model.fp16.onnx",
    "onnx-int8": "model.int8.onnx",
    "torchscript": "model.pt",
    "aoti": "model.pt2",
    "aoti-fp16": "model.fp16.pt2",
    "aoti-bf16": "model.bf16.pt2",
    "tensorrt": "model.plan",
    "openvino": "model.xml",  # + model.bin beside each .xml
    "openvino-bf16": "model.bf16.xml",
    "openvino-int8": "model.int8.xml",
}


def file_sha256(path: str | Path) -> str:
    """The sha256 of the file at `path` (hex), read in 1 MiB chunks."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def format_names(formats: Iterable[str]) -> list[str]:
    """The requested formats, in order, once each; a `VitfoldError` naming the first unknown one (or none)."""
    from vitfold.errors import VitfoldError

    names = list(dict.fromkeys(formats))
    unknown = [f for f in names if f not in FORMATS]
    if unknown or not names:
        raise VitfoldError(
            f"unknown format (choose from {', '.join(FORMATS)})", argument="formats", value=(unknown or [""])[0]
        )
    return names


_API = {
    "export": "vitfold.export.exporting",
    "open_runner": "vitfold.export.runners",
    "compare": "vitfold.export.comparison",
    "Comparison": "vitfold.export.comparison",
    "Tolerance": "vitfold.export.comparison",
}

__all__ = ["DEFAULT_FORMATS", "FILES", "FORMATS", "PRECISIONS", "file_sha256", "format_names", *sorted(_API)]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'vitfold.export' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
