"""vitfold: fine-tune timm ViTs with foldable adapters (RLRR, EFFT), fold them away, export and verify.

The library API (PEFT-like)::

    import timm, vitfold
    model = timm.create_model("vit_base_patch16_224")
    model = vitfold.adapt(model, method="rlrr", num_classes=10)     # or vitfold.adapt(model, vitfold.RLRRConfig())
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

# public name -> (module, attribute): imported on first use, listed by dir() and help()
_API = {
    "adapt": ("vitfold.pipeline.adapting", "adapt"),
    "adapter_state_dict": ("vitfold.pipeline.adapting", "adapter_state_dict"),
    "load_adapter": ("vitfold.pipeline.adapting", "load_adapter"),
    "parameter_counts": ("vitfold.pipeline.adapting", "parameter_counts"),
    "save_adapter": ("vitfold.pipeline.adapting", "save_adapter"),
    "fold": ("vitfold.pipeline.folding", "fold"),
    # typed options per method (PEFT's LoraConfig): `vitfold.adapt(model, vitfold.RLRRConfig(init="paper"))`
    "RLRRConfig": ("vitfold.pipeline.adapters.rlrr", "RLRROptions"),
    "EFFT1Config": ("vitfold.pipeline.adapters.efft", "EFFTOptions"),
    "EFFT2Config": ("vitfold.pipeline.adapters.efft", "EFFT2Options"),
    "LoRAConfig": ("vitfold.pipeline.adapters.baselines", "LoRAOptions"),
    "LinearConfig": ("vitfold.pipeline.adapters.baselines", "LinearOptions"),
    "FullConfig": ("vitfold.pipeline.adapters.baselines", "FullOptions"),
    "VitfoldError": ("vitfold.errors", "VitfoldError"),
}

__all__ = ["__version__", *sorted(_API)]


def __getattr__(name: str) -> Any:
    if name in _API:
        module, attribute = _API[name]
        return getattr(import_module(module), attribute)
    raise AttributeError(f"module 'vitfold' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
