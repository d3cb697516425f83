"""The transformer blocks of a timm model, by timm's module names: the unit divergences are localised to.

A ViT's blocks are `blocks.i`; a Swin's are `layers.i.blocks.j` (its stages, in order). The same names
are the dynamo exporter's ONNX name scopes, so one pattern finds a block in a module tree and in a graph.
"""

from __future__ import annotations

import re

from torch import nn

BLOCK = re.compile(r"^(?:layers\.\d+\.)?blocks\.\d+$")


def block_order(name: str) -> tuple[int, ...]:
    """Sort key of a block name: its indices (stage, block), so that `layers.1.blocks.0` follows
    `layers.0.blocks.11`."""
    return tuple(int(part) for part in name.split(".") if part.isdigit())


def block_names(model: nn.Module) -> list[str]:
    """The names of the model's blocks, in forward order."""
    return sorted((name for name, _ in model.named_modules() if BLOCK.match(name)), key=block_order)
