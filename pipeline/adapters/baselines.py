"""The baselines users compare against: linear probe, full fine-tuning, and LoRA (foldable too).

LoRA (Hu et al. 2021) on every block's (ViT or Swin) `attn.qkv`, `attn.proj`, `mlp.fc1`, `mlp.fc2`, in nn.Linear
orientation:  W' = W + (α / r) B A,  A ∈ R^{r×in} (kaiming-uniform, as PEFT), B ∈ R^{out×r} (zero), so
the adapted model equals the base at step 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from vitfold.errors import AdapterError
from vitfold.pipeline.adapters.base import AdapterMethod, AdditiveLinear, check_rank, is_number
from vitfold.pipeline.adapters.targets import find_targets


@dataclass(frozen=True)
class LinearOptions:
    """The linear probe takes no options."""


@dataclass(frozen=True)
class FullOptions:
    """Full fine-tuning takes no options."""


class LinearProbe(AdapterMethod):
    """Only the (new) head trains."""

    name = "linear"
    options_type = LinearOptions

    def attach(self, model: nn.Module) -> None:
        find_targets(model, shifts=False)


class FullFineTune(AdapterMethod):
    """Every parameter trains; the adapter state is the whole model (there is nothing to fold)."""

    name = "full"
    options_type = FullOptions

    def attach(self, model: nn.Module) -> None:
        find_targets(model, shifts=False)

    @classmethod
    def trainable_base(cls, model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        return model.named_parameters()


@dataclass(frozen=True)
class LoRAOptions:
    """rank r and α (None: α = r, a scale of 1)."""

    rank: int = 8
    alpha: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise AdapterError(f"option 'rank' must be a positive integer for method 'lora', got {self.rank!r}")
        if self.alpha is not None and not is_number(self.alpha):
            raise AdapterError(f"option 'alpha' must be a finite number for method 'lora', got {self.alpha!r}")


class LoRALinear(AdditiveLinear):
    """W' = W + (α / r) B A."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__(base)
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.A = nn.Parameter(torch.empty(rank, base.in_features, **kw))
        self.B = nn.Parameter(torch.zeros(base.out_features, rank, **kw))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scaling = alpha / rank

    def delta(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        a, b = (self.A, self.B) if dtype is None else (self.A.to(dtype), self.B.to(dtype))
        return self.scaling * (b @ a)  # [out, r] @ [r, in] -> [out, in]

    def extra_repr(self) -> str:
        return f"rank={self.A.shape[0]}, scaling={self.scaling:g}"


class LoRA(AdapterMethod):
    name = "lora"
    options_type = LoRAOptions

    def attach(self, model: nn.Module) -> None:
        rank = self.options.rank
        alpha = float(self.options.alpha if self.options.alpha is not None else rank)
        for target in find_targets(model, shifts=False).linears:
            base = model.get_submodule(target.name)
            check_rank(rank, min(base.in_features, base.out_features), "rank", self.name, target.name)
            model.set_submodule(target.name, LoRALinear(model.get_submodule(target.name), rank, alpha))
