"""Adapter registry: method name -> `AdapterMethod` subclass. A new method is one module plus one entry."""

from __future__ import annotations

from vitfold.errors import AdapterError
from vitfold.pipeline.adapters.base import AdapterLayer, AdapterMethod, AdapterModule, AdapterRecord
from vitfold.pipeline.adapters.baselines import FullFineTune, LinearProbe, LoRA
from vitfold.pipeline.adapters.efft import EFFT1, EFFT2
from vitfold.pipeline.adapters.rlrr import RLRR

METHODS: dict[str, type[AdapterMethod]] = {
    cls.name: cls for cls in (RLRR, EFFT1, EFFT2, LoRA, LinearProbe, FullFineTune)
}


def get_method(name: str) -> type[AdapterMethod]:
    """The method class registered under `name`; an `AdapterError` naming the known ones otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise AdapterError(f"unknown method '{name}' (known: {', '.join(sorted(METHODS))})") from None


__all__ = ["METHODS", "AdapterLayer", "AdapterMethod", "AdapterModule", "AdapterRecord", "get_method"]
