"""Comparison statistics of logits against a reference, tolerances, and the per-block localisation.

For logits y (a backend) and r (the reference), rows = images:

    max_abs   = max |y − r|            mean_abs = mean |y − r|       p99_abs = 99th pct of |y − r|
    max_rel   = max |y − r| / max |r|  (error relative to the logit scale; the export bar is 1e-4; 0 when y = r)
    cosine_min     = min over images of cos(y_i, r_i) = y_i·r_i / (‖y_i‖ ‖r_i‖); a row where ‖y_i‖ ‖r_i‖ = 0 (a
                     zero row, e.g. an untrained head that starts at zero) counts 1 when y_i = r_i, else 0
    top1_agreement = share of images with argmax y_i = argmax r_i
    kl_mean        = mean over images of KL(softmax r_i ‖ softmax y_i)

The elementwise bar, as Polygraphy and `torch.testing.assert_close` apply it (when a `Tolerance` sets atol
or rtol; the unset one is 0), at its rtol:

    atol_needed           = max over elements of |y − r| − rtol·|r|   (the least atol that passes)
    elementwise_mismatches = number of elements with not |y − r| ≤ atol + rtol·|r|   (NaN included)

All in float64. An output passes when it clears every bar its `Tolerance` sets (max_rel ≤ tol.max_rel,
cosine_min ≥ tol.cosine_min, top1_agreement ≥ tol.top1_min, and on a labelled evaluation split, see
`split_stats`, split_top1_agreement ≥ tol.split_top1_min and accuracy_delta ≥ tol.accuracy_delta_min).
When atol or rtol is set, |y − r| ≤ atol + rtol·|r| for every element (atol_needed ≤ tol.atol measured at
tol.rtol) is the numeric bar and replaces max_rel and cosine_min; top-1 and the split bars still apply.
Identical outputs always pass every numeric bar.
`compare(reference, output, tolerances)` returns a `Comparison` that carries the statistics and is truthy
only then.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from vitfold.errors import VitfoldError

# bar -> (the statistic it bounds, whether the statistic must be >= the bar rather than <=)
BARS = {
    "max_rel": ("max_rel", False),
    "cosine_min": ("cosine_min", True),
    "top1_min": ("top1_agreement", True),
    "split_top1_min": ("split_top1_agreement", True),
    "accuracy_delta_min": ("accuracy_delta", True),
    "atol": ("atol_needed", False),  # measured at the tolerance's rtol (`Tolerance.elementwise`)
}
ELEMENTWISE = ("atol", "rtol")  # rtol is no bar of its own: the parameter of atol_needed
REPLACED_BY_ELEMENTWISE = ("max_rel", "cosine_min")  # the numeric bars an elementwise bar replaces
# bar -> the range a value of it must lie in (checked wherever tolerances are read: CLI and config)
RANGES = {
    "max_rel": (0.0, float("inf")),
    "atol": (0.0, float("inf")),
    "rtol": (0.0, float("inf")),
    "cosine_min": (0.0, 1.0),
    "top1_min": (0.0, 1.0),
    "split_top1_min": (0.0, 1.0),
    "accuracy_delta_min": (-100.0, 100.0),  # points
}
# every field of a Tolerance -> whether it is a lower bound (a larger rtol lets more through, like an atol)
LIMITS = {bar: at_least for bar, (_, at_least) in BARS.items()} | {"rtol": False}


def _checked_overrides(overrides: Mapping[str, Any], where: str) -> dict[str, float]:
    """`overrides` as floats; a one-line `VitfoldError` for an unknown key, a non-number, NaN or a value
    outside its bar's range (`RANGES`: non-negative; cosine and top-1 within [0, 1])."""
    for key, value in overrides.items():
        if key not in LIMITS:
            raise VitfoldError(f"{where}: unknown key '{key}' (known: {', '.join([*LIMITS, *DEFAULT_TOLERANCES])})")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise VitfoldError(f"{where}: '{key}' must be a number, got {value!r}")
        low, high = RANGES[key]
        if not (math.isfinite(value) and low <= value <= high):
            raise VitfoldError(f"{where}: '{key}' must be a finite number in [{low:g}, {high:g}], got {value!r}")
    return {k: float(v) for k, v in overrides.items()}


@dataclass(frozen=True)
class Tolerance:
    """The bars an output must clear; None: not judged on that statistic. The split bars judge the
    evaluation split (`split_stats`): top-1 agreement with the reference and the accuracy change (points).
    atol and rtol make one elementwise bar, |y − r| ≤ atol + rtol·|r| (`elementwise`)."""

    max_rel: float | None = None
    cosine_min: float | None = None
    top1_min: float | None = None
    split_top1_min: float | None = None
    accuracy_delta_min: float | None = None
    atol: float | None = None
    rtol: float | None = None

    @property
    def elementwise(self) -> tuple[float, float] | None:
        """(atol, rtol) of the elementwise bar when either is set (the other is 0), else None."""
        if self.atol is None and self.rtol is None:
            return None
        return self.atol or 0.0, self.rtol or 0.0

    @property
    def bars(self) -> dict[str, float]:
        """The bars this tolerance judges by (name -> limit): with an elementwise bar, atol (at `rtol`) in
        place of max_rel and cosine_min."""
        limits = {bar: getattr(self, bar) for bar in BARS}
        if self.elementwise is not None:
            limits["atol"] = self.elementwise[0]
            limits |= dict.fromkeys(REPLACED_BY_ELEMENTWISE)
        return {bar: limit for bar, limit in limits.items() if limit is not None}

    def check(self, stats: dict[str, float]) -> bool:
        """Every bar judged (`bars`) is cleared; a statistic a bar needs but `stats` lacks fails (closed), and
        so does an atol_needed measured at another rtol than this tolerance's."""
        limits = self.bars
        if self.elementwise is not None and stats.get("rtol") != self.elementwise[1]:
            return False
        for bar, limit in limits.items():
            stat, at_least = BARS[bar]
            value = stats.get(stat)
            if value is None or not (value >= limit if at_least else value <= limit):
                return False
        return True

    def to_dict(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def looser_than(self, other: Tolerance) -> dict[str, float | None]:
        """The bars of this tolerance that let more through than `other`'s (name -> this value; None when
        this one drops a bar `other` judges by, e.g. max_rel replaced by an elementwise bar)."""
        mine, theirs = self._limits(), other._limits()
        looser = {}
        for bar, at_least in LIMITS.items():
            if bar in theirs and (
                bar not in mine or (mine[bar] < theirs[bar] if at_least else mine[bar] > theirs[bar])
            ):
                looser[bar] = mine.get(bar)
        return looser

    def _limits(self) -> dict[str, float]:
        """`bars`, and the rtol of the elementwise bar when there is one."""
        return self.bars | ({"rtol": self.elementwise[1]} if self.elementwise else {})

    def __post_init__(self) -> None:
        _checked_overrides(self.to_dict(), "Tolerance")


# fp32: the fold and every fp32 artifact must agree to float32 rounding; fp16 artifacts to fp16 rounding,
# and may flip no more than 2% of top-1 decisions (near-ties); bf16 keeps 8 mantissa bits to fp16's 11.
# int8 is judged where quantization is judged: top-1 agreement with fp32 on the whole evaluation split
# and the accuracy change there (points), not elementwise.
DEFAULT_TOLERANCES = {
    "fp32": Tolerance(max_rel=1e-4, cosine_min=0.99999, top1_min=1.0),
    "fp16": Tolerance(max_rel=2e-2, cosine_min=0.999, top1_min=0.98),
    "bf16": Tolerance(max_rel=8e-2, cosine_min=0.995, top1_min=0.95),
    "int8": Tolerance(split_top1_min=0.99, accuracy_delta_min=-0.5),
}


def tolerances_for(overrides: Mapping[str, Any] | None = None) -> dict[str, Tolerance]:
    """precision -> its default tolerance with `overrides`: a bar set at the top level changes every
    precision that has that bar (atol and rtol: every precision judged elementwise, i.e. with a max_rel
    bar, so not int8); `{precision: {bar: value}}` changes that precision's. An unknown key or a
    non-number is a one-line `VitfoldError` naming it."""
    overrides = dict(overrides or {})
    per_precision = {p: overrides.pop(p) for p in DEFAULT_TOLERANCES if p in overrides}
    common = _checked_overrides(overrides, "tolerances")
    result = {}
    for precision, default in DEFAULT_TOLERANCES.items():
        own = per_precision.get(precision, {})
        if not isinstance(own, Mapping):
            raise VitfoldError(f"tolerances: '{precision}' must be a mapping of bars, got {own!r}")
        has = {k for k in common if getattr(default, "max_rel" if k in ELEMENTWISE else k) is not None}
        shared = {k: v for k, v in common.items() if k in has}
        result[precision] = replace(default, **shared, **_checked_overrides(own, f"tolerances.{precision}"))
    return result


def tolerance_for(precision: str, overrides: Mapping[str, Any] | None = None) -> Tolerance:
    """The tolerance of `precision` (see `tolerances_for`)."""
    if precision not in DEFAULT_TOLERANCES:
        raise VitfoldError(f"no tolerance for precision '{precision}' (known: {', '.join(DEFAULT_TOLERANCES)})")
    return tolerances_for(overrides)[precision]


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


Array = Any  # a torch.Tensor, a numpy array, or anything torch.as_tensor takes


def _as_tensor(x: Array) -> torch.Tensor:
    return x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(x)


def compare(reference: Array, output: Array, tolerances: Tolerance | Mapping[str, float] | None = None) -> Comparison:
    """Compare (B, C) logits with the reference's: torch tensors or numpy arrays (what ONNX Runtime
    returns). `tolerances`: a `Tolerance`, or overrides of the fp32 defaults (max_rel, cosine_min, top1_min,
    atol, rtol), or None for the fp32 defaults. A Tolerance with split bars (int8's) needs `split_stats`
    merged into the statistics: `Comparison({**c.stats, **split}, tol)`."""
    reference, output = _as_tensor(reference), _as_tensor(output)
    if tuple(reference.shape) != tuple(output.shape) or reference.dim() != 2:
        raise VitfoldError(f"compare: logits of shape {tuple(output.shape)} against {tuple(reference.shape)}")
    tol = tolerances if isinstance(tolerances, Tolerance) else tolerance_for("fp32", tolerances)
    stats = logit_stats(output, reference)
    if tol.elementwise is not None:
        stats |= elementwise_stats(output, reference, *tol.elementwise)
    return Comparison(stats, tol)


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
        "cosine_min": float(row_cosines(y, r).min()),
        "top1_agreement": float((y.argmax(-1) == r.argmax(-1)).double().mean()),
        "kl_mean": float((log_p.exp() * (log_p - log_q)).sum(-1).mean()),
    }


def row_cosines(y: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """cos(y_i, r_i) per row (B,); a row with ‖y_i‖ ‖r_i‖ = 0 is 1 when y_i = r_i, else 0."""
    norms = y.norm(dim=-1) * r.norm(dim=-1)
    cosines = (y * r).sum(-1) / norms.clamp_min(torch.finfo(y.dtype).tiny)
    return torch.where(norms > 0, cosines, (y == r).all(-1).to(y.dtype))


def elementwise_stats(y: torch.Tensor, r: torch.Tensor, atol: float, rtol: float) -> dict[str, float]:
    """The elementwise statistics above of `y` against `r` at (atol, rtol), and that rtol."""
    y, r = y.detach().cpu().double(), r.detach().cpu().double()
    diff = (y - r).abs()
    return {
        "rtol": rtol,
        "atol_needed": float((diff - rtol * r.abs()).max()),
        "elementwise_mismatches": int((~(diff <= atol + rtol * r.abs())).sum()),
    }


def split_stats(predicted: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Top-1 predictions (n,) of an output and of its reference on a labelled split (n,):

    split_accuracy       = share of images with predicted = label (the reference's: reference_accuracy)
    split_top1_agreement = share of images with predicted = reference's prediction
    accuracy_delta       = 100 · (split_accuracy − reference_accuracy), in points
    """
    if not predicted.shape == reference.shape == labels.shape or predicted.dim() != 1 or not len(labels):
        raise VitfoldError(f"split_stats: predictions {tuple(predicted.shape)} against {tuple(reference.shape)}")
    accuracy = float((predicted == labels).double().mean())
    reference_accuracy = float((reference == labels).double().mean())
    return {
        "split_images": len(labels),
        "split_accuracy": accuracy,
        "reference_accuracy": reference_accuracy,
        "split_top1_agreement": float((predicted == reference).double().mean()),
        "accuracy_delta": 100 * (accuracy - reference_accuracy),
    }


def block_errors(blocks: list[torch.Tensor], reference: list[torch.Tensor]) -> list[float]:
    """‖b − r‖ / ‖r‖ per block output."""
    if len(blocks) != len(reference):
        raise VitfoldError(f"the artifact exposes {len(blocks)} block outputs, the reference has {len(reference)}")
    pairs = zip(blocks, reference, strict=True)
    return [float((b.cpu().double() - r.cpu().double()).norm() / r.cpu().double().norm()) for b, r in pairs]


def first_diverging_block(errors: list[float], threshold: float, names: list[str] | None = None) -> dict[str, Any]:
    """The first block whose relative error exceeds `threshold` (or is NaN), by index and by name (`names`,
    in forward order; default `blocks.k`); if none does, the part after the blocks (final norm, pooling,
    head)."""
    for k, err in enumerate(errors):
        if not err <= threshold:
            where = names[k] if names else f"blocks.{k}"
            return {"block": k, "where": where, "relative_error": err, "block_errors": errors}
    return {"block": None, "where": "after the last block (norm / head)", "block_errors": errors}
