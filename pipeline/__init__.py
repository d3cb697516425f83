"""vitfold pipeline: timm ViT + foldable adapters -> plain timm model.

The library API (PEFT-like)::

    import timm, pipeline
    model = timm.create_model("vit_base_patch16_224")
    model = pipeline.adapt(model, method="rlrr", num_classes=10)
    ...  # train
    plain = pipeline.fold(model)            # a plain timm model, same state_dict keys as a fresh one
    state = pipeline.adapter_state_dict(model)  # adapter + head tensors only

Heavy imports (torch, timm) happen on first use, so `vitfold --help` stays instant.
"""

from importlib import import_module
from typing import Any

_API = {
    "adapt": "pipeline.adapting",
    "adapter_state_dict": "pipeline.adapting",
    "load_adapter": "pipeline.adapting",
    "parameter_counts": "pipeline.adapting",
    "fold": "pipeline.folding",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
