"""RLRR: residual low-rank rescaling (Dong et al., CVPR 2024), as the official code places it.

Linear layers (timm's fused `attn.qkv`, `attn.proj`, `mlp.fc1`, `mlp.fc2` of every block; on Swin also
each PatchMerging `reduction`), in `nn.Linear` orientation W[out, in] (paper Eq. 16/20):

    W' = W ⊙ (1 + s_out s_inᵀ)        b' = b + f

The official ViT code gives q, k and v (the three row blocks of the fused qkv) an input scale s_in each;
its Swin code shares one s_in of size C across q, k, v (s_out and f of size 3C). Swin's reduction has no
bias in timm, so the official shift f becomes its only bias: `reduction_shift=true` keeps it (the folded
model then carries `reduction.bias`, which plain timm does not load), the default leaves it out (the
reduction gets the scales alone and the folded model is exactly timm's Swin).

The RLRR paper's Table 6 ablations (`scales`, `residual`): s_in is the paper's s_left (it scales the rows
of W in x·W orientation, the input features) and s_out its s_right. `scales: left` keeps s_in alone
(W ⊙ (1 + 1 s_inᵀ)), `right` s_out alone (W ⊙ (1 + s_out 1ᵀ)); `residual: false` drops the 1
(W ⊙ (s_out s_inᵀ), W ⊙ (1 s_inᵀ), W ⊙ (s_out 1ᵀ)). Every variant folds the same way.

SSF (scale γ, shift β) on the output of `norm1`, `norm2`, the final norm, and (ViT only) of the
patch-embedding conv (the patch tokens, before the class token and position embedding are added):

    y = base(x) ⊙ γ + β    folds to    W' = W ⊙ γ (per output channel),  b' = b ⊙ γ + β
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vitfold.errors import AdapterError
from vitfold.pipeline.adapters.base import AdapterLayer, AdapterMethod, as_float64
from vitfold.pipeline.adapters.targets import find_targets

INITS = ("paper", "identity")
SCALES = ("both", "left", "right")  # which scale vectors train: s_in (left) and s_out (right), or one of them


@dataclass(frozen=True)
class RLRROptions:
    """`init="paper"`: the official init (kaiming-uniform scales, zero shifts, SSF N(1, .02)/N(0, .02));
    without the residual term the scales start at N(1, .02) instead (the SSF init the official code keeps
    commented out), since the kaiming product would replace W. `init="identity"`: the adapted model equals
    the base (with the residual: s_out = 0, or the one trained scale 0; without it: scales 1; shifts 0,
    SSF γ = 1, β = 0). `scales`: both | left | right; `residual`: keep the 1 of 1 + s_out s_inᵀ;
    `reduction_shift`: give Swin's bias-free PatchMerging reductions a shift (the official code)."""

    init: str = "paper"
    scales: str = "both"
    residual: bool = True
    reduction_shift: bool = False

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise AdapterError(f"option 'init' must be one of {', '.join(INITS)} for method 'rlrr', got '{self.init}'")
        if self.scales not in SCALES:
            choices = " | ".join(SCALES)
            raise AdapterError(f"option 'scales' must be {choices} for method 'rlrr', got {self.scales!r}")
        for name in ("residual", "reduction_shift"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise AdapterError(f"option '{name}' must be true or false for method 'rlrr', got {value!r}")


class RLRRLinear(AdapterLayer):
    """W' = W ⊙ (r + s_out s_inᵀ), b' = b + f (r = 1 with the residual term, else 0), with one s_in per
    block of `groups` equal row blocks; a scale that does not train (`scales`) is a vector of ones.
    Without `shift` there is no f (b' = b); with it on a bias-free layer, b' = f.

    The forward builds W' once per call (O(out·in) elementwise work) and runs one matmul, so a training
    step costs about what full fine-tuning's does, instead of a second activation matmul.
    """

    s_out: nn.Parameter | None
    s_in: nn.Parameter | None

    def __init__(self, base: nn.Linear, groups: int, opts: RLRROptions, shift: bool = True) -> None:
        super().__init__(base)
        out_features, in_features = base.weight.shape
        self.groups, self.residual = groups, opts.residual
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.s_out = nn.Parameter(torch.empty(out_features, **kw)) if opts.scales != "left" else None
        self.s_in = nn.Parameter(torch.empty(groups, in_features, **kw)) if opts.scales != "right" else None
        self.f = nn.Parameter(torch.zeros(out_features, **kw)) if shift else None
        # official code: kaiming_uniform_ (a=0) on s_in as [1, in] (fan-in = in) and s_out as [out, 1] (fan-in 1)
        bounds = {"s_in": math.sqrt(6 / in_features), "s_out": math.sqrt(6)}
        trained = [(name, p) for name, p in (("s_in", self.s_in), ("s_out", self.s_out)) if p is not None]
        for name, p in trained:
            if not opts.residual and opts.init == "identity":  # the scales are the weight's multipliers
                nn.init.ones_(p)
            elif not opts.residual:
                nn.init.normal_(p, mean=1.0, std=0.02)
            elif opts.init == "identity" and name == trained[-1][0]:  # s_out, or the one trained scale
                nn.init.zeros_(p)
            else:
                nn.init.uniform_(p, -bounds[name], bounds[name])

    def _weight(self, weight: torch.Tensor, s_out: torch.Tensor | None, s_in: torch.Tensor | None) -> torch.Tensor:
        """W' = W ⊙ (r + s_out s_inᵀ) with as few views as the groups need: an eager training step pays the
        host for every op it dispatches, views included (on a GPU, most of RLRR's cost over full fine-tuning)."""
        out_features, in_features = weight.shape
        g = self.groups
        if g > 1:  # one s_in per row block; a single block broadcasts [out, in] as it is
            weight = weight.view(g, out_features // g, in_features)  # [g, out/g, in]
            s_in = None if s_in is None else s_in.view(g, 1, in_features)  # [g, 1, in]
        rows = 1 if s_out is None else s_out.view(*weight.shape[:-1], 1)  # [out, 1] or [g, out/g, 1]
        columns = 1 if s_in is None else s_in  # [1, in] or [g, 1, in]
        scale = rows * columns + 1 if self.residual else rows * columns
        scaled = weight * scale
        return scaled if g == 1 else scaled.view(out_features, in_features)  # [out, in]

    @staticmethod
    def _bias(bias: torch.Tensor | None, f: torch.Tensor | None) -> torch.Tensor | None:
        """b' = b + f; b alone without a shift, f alone on a bias-free layer."""
        if f is None or bias is None:
            return bias if f is None else f
        return bias + f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._weight(self.base.weight, self.s_out, self.s_in), self._bias(self.base.bias, self.f))

    def folded_parameters(self) -> dict[str, torch.Tensor]:
        s_out, s_in, bias, f = (as_float64(t) for t in (self.s_out, self.s_in, self.base.bias, self.f))
        folded = {"weight": self._weight(as_float64(self.base.weight), s_out, s_in), "bias": self._bias(bias, f)}
        return {name: t for name, t in folded.items() if t is not None}


class SSF(AdapterLayer):
    """y = base(x) ⊙ γ + β on the channels of base's output (a LayerNorm's last axis, a Conv2d's axis 1).

    Folds into base's per-output-channel weight and bias: W' = W ⊙ γ, b' = b ⊙ γ + β.
    """

    base: nn.LayerNorm | nn.Conv2d

    def __init__(self, base: nn.LayerNorm | nn.Conv2d, init: str) -> None:
        super().__init__(base)
        channels = base.weight.shape[0]
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.scale = nn.Parameter(torch.ones(channels, **kw))
        self.shift = nn.Parameter(torch.zeros(channels, **kw))
        if init != "identity":
            nn.init.normal_(self.scale, mean=1.0, std=0.02)
            nn.init.normal_(self.shift, mean=0.0, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if isinstance(self.base, nn.Conv2d):  # [B, C, H, W]: the channels on axis 1
            return torch.addcmul(self.shift.view(-1, 1, 1), y, self.scale.view(-1, 1, 1))
        return torch.addcmul(self.shift, y, self.scale)  # [..., C]: one op, where y ⊙ γ + β is two

    def folded_parameters(self) -> dict[str, torch.Tensor]:
        weight, bias, scale, shift = (as_float64(t) for t in (self.base.weight, self.base.bias, self.scale, self.shift))
        per_channel = scale.view(-1, *[1] * (weight.dim() - 1))  # broadcast over a conv's [C, c, kh, kw]
        return {"weight": weight * per_channel, "bias": shift if bias is None else bias * scale + shift}


class RLRR(AdapterMethod):
    """Attach RLRR to every block's linears (and Swin's reductions) and SSF to the norms and, in a ViT, the
    patch tokens (RLRR paper §3.3)."""

    name = "rlrr"
    options_type = RLRROptions

    @classmethod
    def head_init(cls, family: str) -> str:
        """The official ViT code zeroes the new head; its Swin code draws it from trunc_normal_(std=0.02)."""
        return "trunc-normal" if family == "swin" else "zero"

    @classmethod
    def no_weight_decay(cls, name: str) -> bool:
        """The official rule on the official names: the shift `f` is the official `shift_bias` (exempt),
        the SSF after a norm carries "norm" (exempt); the scales, the patch SSF and the head weight decay."""
        official = name.removesuffix(".f") + ".shift_bias" if name.endswith(".f") else name
        return "bias" in official or "norm" in official

    def attach(self, model: nn.Module) -> None:
        targets = find_targets(model, shifts=True)
        init = self.options.init
        if targets.patch_proj is not None:
            model.set_submodule(targets.patch_proj, SSF(model.get_submodule(targets.patch_proj), init=init))
        for target in targets.linears + targets.reductions:
            shift = target.shift or self.options.reduction_shift
            layer = RLRRLinear(model.get_submodule(target.name), target.groups, self.options, shift=shift)
            model.set_submodule(target.name, layer)
        norms = targets.block_norms + ((targets.final_norm,) if targets.final_norm else ())
        for name in norms:
            model.set_submodule(name, SSF(model.get_submodule(name), init=init))
