"""Fold an adapted model back into a plain timm model (PEFT's `merge_and_unload`, made exact and safe).

Every adapter layer is replaced by `layer.fuse()`: the base layer with the adapter folded into its
weights in float64, cast back to the weight dtype. Adapter modules that only feed the layers (shared
factors) and the hooks they registered are then removed. The input model is left as it was.
"""

from __future__ import annotations

import copy

from torch import nn

from vitfold.pipeline.adapters.base import check_finite
from vitfold.pipeline.adapting import RECORD_ATTR, adapter_layers, adapter_modules, trainable_named_parameters


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
    for name, module in list(adapter_modules(plain)):
        module.remove_hooks()
        parent, _, child = name.rpartition(".")
        delattr(plain.get_submodule(parent), child)
    delattr(plain, RECORD_ATTR)
    plain.requires_grad_(True)
    return plain
