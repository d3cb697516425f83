"""Fold check: fold an adapted model and measure, on given inputs, how far the folded model is from the
unmerged one, and how far each is from a float64 evaluation of the unmerged model."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from pipeline.folding import fold


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """‖value − reference‖ / ‖reference‖, computed in float64."""
    ref = reference.double()
    return float((value.double() - ref).norm() / ref.norm())


def fold_check(adapted: nn.Module, batches: list[torch.Tensor]) -> dict[str, Any]:
    """Relative logit errors per batch: folded vs unmerged (float32), and each vs float64 unmerged."""
    adapted = adapted.eval()
    folded = fold(adapted).eval()
    reference64 = copy.deepcopy(adapted).double()
    rows = []
    with torch.no_grad():
        for x in batches:
            unmerged, plain, exact = adapted(x), folded(x), reference64(x.double())
            rows.append({
                "batch_size": len(x),
                "folded_vs_unmerged": relative_error(plain, unmerged),
                "unmerged_vs_float64": relative_error(unmerged, exact),
                "folded_vs_float64": relative_error(plain, exact),
            })  # fmt: skip
    return {"results": rows}
