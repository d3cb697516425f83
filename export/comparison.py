"""Comparison statistics of logits against a reference, tolerances, and the per-block localisation.

For logits y (a backend) and r (the reference), rows = images:

    max_abs   = max |y − r|            mean_abs = mean |y − r|       p99_abs = 99th pct of |y − r|
    max_rel   = max |y − r| / max |r|  (error relative to the logit scale; the export bar is 1e-4)
    cosine_min     = min over images of cos(y_i, r_i)
    top1_agreement = share of images with argmax y_i = argmax r_i
    kl_mean        = mean over images of KL(softmax r_i ‖ softmax y_i)

All in float64. An output passes when max_rel ≤ tol.max_rel, cosine_min ≥ tol.cosine_min and
top1_agreement ≥ tol.top1_min: `compare(reference, output, tolerances)` returns a `Comparison` that
carries the statistics and is truthy only then.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch

from vitfold.errors import VitfoldError


@dataclass(frozen=True)
class Tolerance:
    max_rel: float
    cosine_min: float
    top1_min: float

    def check(self, stats: dict[str, float]) -> bool:
        return (
            stats["max_rel"] <= self.max_rel
            and stats["cosine_min"] >= self.cosine_min
            and stats["top1_agreement"] >= self.top1_min
        )

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    def looser_than(self, other: Tolerance) -> dict[str, float]:
        """The bars of this tolerance that let more through than `other`'s (name -> this value)."""
        looser = {
            "max_rel": self.max_rel > other.max_rel,
            "cosine_min": self.cosine_min < other.cosine_min,
            "top1_min": self.top1_min < other.top1_min,
        }
        return {k: getattr(self, k) for k, loose in looser.items() if loose}


# fp32: the fold and every fp32 artifact must agree to float32 rounding; fp16 artifacts to fp16 rounding,
# and may flip no more than 2% of top-1 decisions (near-ties).
DEFAULT_TOLERANCES = {
    "fp32": Tolerance(max_rel=1e-4, cosine_min=0.99999, top1_min=1.0),
    "fp16": Tolerance(max_rel=2e-2, cosine_min=0.999, top1_min=0.98),
}


def tolerance_for(precision: str, overrides: Mapping[str, float] | None = None) -> Tolerance:
    """The default tolerance of `precision` with `overrides`; an unknown key or a non-number is a one-line
    `VitfoldError` naming it."""
    if precision not in DEFAULT_TOLERANCES:
        raise VitfoldError(f"no tolerance for precision '{precision}' (known: {', '.join(DEFAULT_TOLERANCES)})")
    known = [f.name for f in fields(Tolerance)]
    for key, value in (overrides or {}).items():
        if key not in known:
            raise VitfoldError(f"tolerances: unknown key '{key}' (known: {', '.join(known)})")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise VitfoldError(f"tolerances: '{key}' must be a number, got {value!r}")
    return replace(DEFAULT_TOLERANCES[precision], **{k: float(v) for k, v in (overrides or {}).items()})


@dataclass(frozen=True)
class Comparison:
    """The statistics of one output against its reference, the tolerance applied, and the verdict."""

    stats: dict[str, float]
    tolerance: Tolerance

    @property
    def passed(self) -> bool:
        return self.tolerance.check(self.stats)

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict[str, Any]:
        """The statistics and `passed`, flat (JSON-ready)."""
        return {**self.stats, "passed": self.passed}


def compare(
    reference: torch.Tensor, output: torch.Tensor, tolerances: Tolerance | Mapping[str, float] | None = None
) -> Comparison:
    """Compare (B, C) logits with the reference's. `tolerances`: a `Tolerance`, or overrides of the fp32
    defaults (max_rel, cosine_min, top1_min), or None for the fp32 defaults."""
    if tuple(reference.shape) != tuple(output.shape) or reference.dim() != 2:
        raise VitfoldError(f"compare: logits of shape {tuple(output.shape)} against {tuple(reference.shape)}")
    tol = tolerances if isinstance(tolerances, Tolerance) else tolerance_for("fp32", tolerances)
    return Comparison(logit_stats(output, reference), tol)


def logit_stats(y: torch.Tensor, r: torch.Tensor) -> dict[str, float]:
    """The statistics above for (B, C) logits."""
    y, r = y.detach().cpu().double(), r.detach().cpu().double()
    diff = (y - r).abs()
    log_p, log_q = torch.log_softmax(r, -1), torch.log_softmax(y, -1)
    return {
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "p99_abs": float(torch.quantile(diff.flatten(), 0.99)),
        "max_rel": float(diff.max() / r.abs().max().clamp_min(1e-30)),
        "cosine_min": float(torch.nn.functional.cosine_similarity(y, r, dim=-1).min()),
        "top1_agreement": float((y.argmax(-1) == r.argmax(-1)).double().mean()),
        "kl_mean": float((log_p.exp() * (log_p - log_q)).sum(-1).mean()),
    }


def block_errors(blocks: list[torch.Tensor], reference: list[torch.Tensor]) -> list[float]:
    """‖b − r‖ / ‖r‖ per block output."""
    pairs = zip(blocks, reference, strict=True)
    return [float((b.cpu().double() - r.cpu().double()).norm() / r.cpu().double().norm()) for b, r in pairs]


def first_diverging_block(errors: list[float], threshold: float) -> dict[str, Any]:
    """The first block whose relative error exceeds `threshold` (or is NaN); if none does, the part after
    the blocks (final norm, pooling, head)."""
    for k, err in enumerate(errors):
        if not err <= threshold:
            return {"block": k, "where": f"blocks.{k}", "relative_error": err, "block_errors": errors}
    return {"block": None, "where": "after the last block (norm / head)", "block_errors": errors}
