"""The adapter contract.

An adapter *method* (RLRR, EFFT, ...) is an `AdapterMethod` subclass with an options dataclass; its
`attach` adds `AdapterModule`s to a timm ViT. Every adapter tensor is a direct parameter of an
`AdapterModule`. An `AdapterLayer` holds the frozen layer it wraps as `base`, computes the adapted
function in `forward`, and folds back into a plain module of `base`'s type with `fuse()` — the hook
timm's `reparameterize_model` calls. Other adapter modules (EFFT's factors shared by all blocks) only
feed the layers and are dropped by the fold. Folds are computed in float64, then cast to the weight dtype.
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from vitfold.errors import AdapterError, FoldError


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool): what a numeric adapter option must be."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def as_float64(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """The tensor in float64, the dtype folds are computed in (None stays None)."""
    return None if tensor is None else tensor.to(torch.float64)


def check_finite(named_tensors: Iterator[tuple[str, torch.Tensor]], what: str = "adapter parameter") -> None:
    """Raise `FoldError` naming the first tensor that holds a NaN or an infinity."""
    for name, tensor in named_tensors:
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise FoldError(f"refusing to fold: {what} '{name}' has {bad} non-finite value(s) (NaN or inf)")


def check_rank(rank: int, limit: int, option: str, method: str, layer: str) -> None:
    """A factor's rank fits the layer it adapts: r ≤ `limit` (the layer's smaller side), checked before any
    factor is allocated (a rank of 100000 would ask for terabytes)."""
    if rank > limit:
        raise AdapterError(
            f"option '{option}' ({rank}) of method '{method}' is larger than the layer it adapts, "
            f"'{layer}' (at most {limit})"
        )


class AdapterModule(nn.Module):
    """A module vitfold adds to a model; its direct parameters are adapter tensors."""

    hooks: list[RemovableHandle]  # hooks it registered on other modules; `remove_hooks` takes them off

    def adapter_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The adapter's own tensors (a wrapped base layer excluded)."""
        return self.named_parameters(recurse=False)

    def remove_hooks(self) -> None:
        """Remove the hooks this module registered (the fold calls it before dropping the module)."""
        for handle in getattr(self, "hooks", ()):
            handle.remove()


class AdapterLayer(AdapterModule):
    """A frozen `base` module plus adapter tensors (its own or shared) that fold exactly back into it."""

    base: nn.Module

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        base.requires_grad_(False)

    @abstractmethod
    def folded_parameters(self) -> dict[str, torch.Tensor]:
        """The base layer's parameters with the adapter folded in, in float64 (name -> tensor)."""

    def fuse(self) -> nn.Module:
        """A plain copy of `base` computing what this layer computes (refuses non-finite adapters)."""
        check_finite(self.adapter_named_parameters())
        plain = copy.deepcopy(self.base)
        with torch.no_grad():
            for name, value in self.folded_parameters().items():
                check_finite(iter([(name, value)]), what="folded weight")
                if getattr(plain, name) is None:  # a bias the adapter gives a bias-free layer (RLRR's Swin reduction)
                    setattr(plain, name, nn.Parameter(torch.empty_like(value, dtype=plain.weight.dtype)))
                target = plain.get_parameter(name)
                target.copy_(value.to(target.dtype))
        plain.requires_grad_(True)
        return plain


class AdditiveLinear(AdapterLayer):
    """W' = W + ΔW, b unchanged: one matmul with the summed weight; folds to W + ΔW built in float64."""

    base: nn.Linear

    @abstractmethod
    def delta(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """ΔW [out, in] for this forward (in `dtype` if given, for the fold)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.base.weight + self.delta(), self.base.bias)

    def folded_parameters(self) -> dict[str, torch.Tensor]:
        return {"weight": self.base.weight.to(torch.float64) + self.delta(torch.float64)}


HEAD_INITS = ("zero", "trunc-normal", "timm")


@dataclass(frozen=True)
class AdapterRecord:
    """What `pipeline.adapt` did to a model; kept on it as `model.vitfold_adapter`."""

    method: str
    options: dict[str, Any]
    new_head: bool  # a new head was created (zero or random, as the method says) and trains with the adapter


class AdapterMethod(ABC):
    """One adapter method: a name, an options dataclass, and how it attaches to a ViT."""

    name: ClassVar[str]
    options_type: ClassVar[type]

    def __init__(self, **options: Any) -> None:
        fields = self.options_type.__dataclass_fields__
        unknown = sorted(set(options) - set(fields))
        if unknown:
            raise AdapterError(
                f"unknown option '{unknown[0]}' for method '{self.name}' (known: {', '.join(sorted(fields))})"
            )
        self.options = self.options_type(**options)

    @abstractmethod
    def attach(self, model: nn.Module) -> None:
        """Wrap the model's layers in adapter layers, in place (the caller freezes the rest)."""

    @classmethod
    def head_init(cls, family: str) -> str:
        """How a new head starts on a model of `family` (one of HEAD_INITS): "zero" (RLRR's official ViT
        code, `zero_head=True`, which the baselines follow), "trunc-normal" (weight from timm's
        trunc_normal_(std=0.02), bias 0: RLRR's official Swin code) or "timm" (timm's `reset_classifier`,
        nn.Linear's default init: EFFT's)."""
        return "zero"

    @classmethod
    def trainable_base(cls, model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        """Base parameters that train too (full fine-tuning); none for a parameter-efficient method."""
        return iter(())

    @classmethod
    def no_weight_decay(cls, name: str) -> bool:
        """Whether the trainable tensor `name` is exempt from weight decay: the official RLRR rule
        (a name containing "bias" or "norm"), which the baselines follow too."""
        return "bias" in name or "norm" in name
