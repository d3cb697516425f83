"""Fold an adapted model back into a plain timm model (PEFT's `merge_and_unload`, made exact and safe).

Every adapter layer is replaced by `layer.fuse()`: the base layer with the adapter folded into its
weights in float64, cast back to the weight dtype. The input model is left as it was.
"""

from __future__ import annotations

import copy

from torch import nn

from pipeline.adapters.base import check_finite
from pipeline.adapting import RECORD_ATTR, adapter_layers, trainable_named_parameters


def fold(model: nn.Module) -> nn.Module:
    """Return a plain timm model equal in function to the adapted `model`, with no adapter module left.

    Its `state_dict()` has the keys and shapes of a fresh `timm.create_model` of the same configuration
    (with the new head's class count). Refuses, naming the tensor and changing nothing, when any adapter
    or head value is non-finite.
    """
    check_finite(trainable_named_parameters(model))  # also raises if `model` was never adapted
    plain = copy.deepcopy(model)
    for name, layer in list(adapter_layers(plain)):
        plain.set_submodule(name, layer.fuse())
    delattr(plain, RECORD_ATTR)
    plain.requires_grad_(True)
    return plain
