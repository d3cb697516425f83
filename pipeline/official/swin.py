"""The Swin backbone of both official codes' checkpoints, under timm 1.0's names.

The official RLRR `models/swin.py` (a modified timm 0.5 Swin) and the official EFFT code (timm 0.5.4's
`SwinTransformer`) keep the Microsoft-release layout: each stage's PatchMerging at its end
(`layers.{i}.downsample`, stages 0..2) and the classifier as `head`; timm >= 0.9 puts the PatchMerging at
the start of the next stage and wraps the classifier:

    layers.{i}.downsample.*  ->  layers.{i+1}.downsample.*        head.{weight,bias}  ->  head.fc.{weight,bias}

(the 2x2 token order of the merge, x0 x1 x2 x3, is the same in both). A checkpoint already in timm 1.0's
layout (`head.fc`, no `layers.0.downsample`) keeps its names. `relative_position_index` and `attn_mask`
are buffers computed from the window size (timm 1.0 does not store them): they are dropped.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

OLD_DOWNSAMPLE = re.compile(r"layers\.(\d+)\.downsample\.")
BUFFERS = r".*\.(relative_position_index|attn_mask)"  # computed, not weights (a regular expression)


def is_release_layout(names: Iterable[str]) -> bool:
    """Whether the names follow the Microsoft release / timm 0.5 layout (stage 0 has a PatchMerging)."""
    return any(name.startswith("layers.0.downsample.") for name in names)


def timm_name(name: str, release_layout: bool) -> str:
    """`name` under timm 1.0's Swin layout (unchanged when it already is)."""
    if release_layout:
        name = OLD_DOWNSAMPLE.sub(lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", name)
    return "head.fc." + name.removeprefix("head.") if name in ("head.weight", "head.bias") else name


def head_names(names: Iterable[str]) -> tuple[str, str]:
    """The classifier's weight and bias names in a checkpoint of either layout."""
    prefix = "head.fc." if "head.fc.weight" in set(names) else "head."
    return prefix + "weight", prefix + "bias"
