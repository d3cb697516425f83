"""vitfold: fine-tune timm ViTs with foldable adapters (RLRR, EFFT), fold them away, export and verify.

The library API (PEFT-like)::

    import timm, vitfold
    model = timm.create_model("vit_base_patch16_224")
    model = vitfold.adapt(model, method="rlrr", num_classes=10)
    ...  # train
    plain = vitfold.fold(model)                  # a plain timm model, same state_dict keys as a fresh one
    state = vitfold.adapter_state_dict(model)    # adapter + head tensors only
    vitfold.save_adapter(model, "adapter.safetensors")                  # + method, options, backbone, version
    model = vitfold.load_adapter(timm.create_model(name), "adapter.safetensors")   # PEFT-style

Deployment: `vitfold.export.export`, `vitfold.export.open_runner`, `vitfold.export.compare`.
Heavy imports (torch, timm) happen on first use, so `vitfold --help` stays instant.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("vitfold")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

_API = {
    "adapt": "vitfold.pipeline.adapting",
    "adapter_state_dict": "vitfold.pipeline.adapting",
    "load_adapter": "vitfold.pipeline.adapting",
    "parameter_counts": "vitfold.pipeline.adapting",
    "save_adapter": "vitfold.pipeline.adapting",
    "fold": "vitfold.pipeline.folding",
}

__all__ = ["__version__", *sorted(_API)]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'vitfold' has no attribute {name!r}")
