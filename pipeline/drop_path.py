"""Drop path on the residual branches of a timm ViT or Swin, in one of two operators.

Block i of L (all blocks in forward order, a Swin's across its stages) has rate p_i = rate · i / (L − 1)
(timm's and the official RLRR code's linear rule), applied to the attention and the MLP branch of `x + branch(x)`:

- `sample` (timm's `DropPath`): a whole sample's branch is kept with probability 1 − p_i and scaled by
  1 / (1 − p_i), else dropped;
- `elementwise` (the official RLRR ViT, `nn.Dropout(p_i)` on each branch): every element of the branch
  output is kept or dropped on its own, kept ones scaled by 1 / (1 − p_i).

`official` picks the official RLRR code's operator for the model's family: `elementwise` on a ViT (its
`models/networks.py`), `sample` on a Swin (its `models/swin.py` uses timm's DropPath). The RLRR recipes use it.

Both are the identity in eval mode, so the fold and the exported model do not depend on them.
"""

from __future__ import annotations

import torch
from torch import nn

from vitfold.export.blocks import block_names

OFFICIAL_OPERATORS = {"vit": "elementwise", "swin": "sample"}  # family -> the official RLRR model's operator
BRANCHES = ("drop_path1", "drop_path2")  # after the attention and after the MLP of a timm (Swin) block


def _blocks(model: nn.Module) -> list[nn.Module]:
    return [model.get_submodule(name) for name in block_names(model)]


def linear_rates(rate: float, depth: int) -> list[float]:
    """p_i = rate · i / (depth − 1), i = 0..depth−1."""
    return [float(p) for p in torch.linspace(0, rate, depth)]


def _operator(p: float, mode: str) -> nn.Module:
    from timm.layers import DropPath

    if p == 0:
        return nn.Identity()
    return nn.Dropout(p) if mode == "elementwise" else DropPath(p)


def resolve_mode(model: nn.Module, mode: str) -> str:
    """`mode`, with `official` replaced by the official RLRR operator for `model`'s family."""
    if mode != "official":
        return mode
    from vitfold.pipeline.adapters.targets import model_family

    return OFFICIAL_OPERATORS[model_family(model)]


def set_drop_path(model: nn.Module, rate: float, mode: str) -> None:
    """Give every block of `model` its drop path at the linear rate, with the `mode` operator, in place."""
    blocks, mode = _blocks(model), resolve_mode(model, mode)
    for block, p in zip(blocks, linear_rates(rate, len(blocks)), strict=True):
        for branch in BRANCHES:
            setattr(block, branch, _operator(p, mode))


def drop_path_operator(model: nn.Module) -> str:
    """The operator `model`'s blocks drop their branches with, read from its modules: elementwise
    (nn.Dropout), sample (timm's DropPath), or none."""
    from timm.layers import DropPath

    modules = [getattr(block, branch) for block in _blocks(model) for branch in BRANCHES]
    if any(isinstance(m, nn.Dropout) for m in modules):
        return "elementwise"
    return "sample" if any(isinstance(m, DropPath) for m in modules) else "none"


def drop_path_rates(model: nn.Module) -> list[float]:
    """The rate each block of `model` drops its branches at (read from its modules; 0 for none)."""

    def rate(module: nn.Module) -> float:
        return float(getattr(module, "p", getattr(module, "drop_prob", 0.0)))

    return [rate(getattr(block, BRANCHES[0])) for block in _blocks(model)]
