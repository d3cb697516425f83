"""`compare` on any arrays: numpy and torch, zero rows, the elementwise bar replacing max_rel and cosine,
and tolerances refused when they are not numbers a bar can hold."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vitfold.errors import VitfoldError
from vitfold.export import compare
from vitfold.export.comparison import Tolerance, tolerances_for


def test_identical_outputs_pass_with_zero_rows_as_numpy_and_torch():
    """An untrained head that starts at zero gives all-zero rows: identical outputs must pass."""
    zeros = np.zeros((2, 5), "f")
    assert compare(zeros, zeros) and compare(torch.zeros(3, 4), torch.zeros(3, 4))
    mixed = np.array([[0.0, 0.0, 0.0], [1.0, -2.0, 3.0]], "f")
    result = compare(mixed, mixed.copy())
    assert result and result.stats["cosine_min"] == 1.0 and result.stats["max_rel"] == 0.0


def test_a_zero_row_against_a_non_zero_row_has_cosine_0_and_fails():
    reference = np.array([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]], "f")
    output = np.array([[0.0, 0.5, 0.0], [1.0, 2.0, 3.0]], "f")
    # by hand: row 0 has ‖r‖ = 0 and y ≠ r -> 0; row 1 is identical -> 1
    assert compare(reference, output).stats["cosine_min"] == 0.0
    assert not compare(reference, output, Tolerance(cosine_min=0.5))


def test_numpy_and_torch_inputs_give_the_same_statistics():
    g = np.random.default_rng(3)
    r = g.normal(size=(4, 6)).astype("f")
    y = r + g.normal(scale=1e-3, size=r.shape).astype("f")
    assert compare(r, y).stats == compare(torch.from_numpy(r), torch.from_numpy(y)).stats
    # cosine of row 0 by hand, in float64
    a, b = y[0].astype(float), r[0].astype(float)
    hand = float(a @ b / math.sqrt(a @ a) / math.sqrt(b @ b))
    assert min(compare(r[:1], y[:1]).stats["cosine_min"], 1.0) == pytest.approx(hand, abs=1e-12)


def test_atol_rtol_replace_max_rel_and_cosine_but_top1_stays():
    """An output 10% off everywhere fails the fp32 max_rel and cosine bars; with atol 1 it passes, as
    torch.testing.assert_close would let it, unless its top-1 changes."""
    r = torch.tensor([[4.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    scaled = r * 1.1 + torch.tensor([0.0, 0.0, 0.3])  # max |Δ| = 0.4 at (0, 0); argmax unchanged
    torch.testing.assert_close(scaled, r, atol=1.0, rtol=0.0)  # the independent reference accepts it
    assert not compare(r, scaled)  # the default bars refuse it
    loose = Tolerance(top1_min=1.0, max_rel=1e-4, cosine_min=0.99999, atol=1.0)
    assert compare(r, scaled, loose) and set(loose.bars) == {"top1_min", "atol"}
    flipped = r.flip(-1)  # every argmax moves; |Δ| ≤ 4
    torch.testing.assert_close(flipped, r, atol=5.0, rtol=0.0)
    assert not compare(r, flipped, Tolerance(top1_min=1.0, atol=5.0))
    assert compare(r, scaled, tolerances_for({"atol": 1.0})["fp32"])


def test_an_elementwise_bar_counts_as_dropping_max_rel_and_cosine():
    defaults = tolerances_for()["fp32"]
    assert tolerances_for({"atol": 1e-5})["fp32"].looser_than(defaults) == {"max_rel": None, "cosine_min": None}


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"atol": -1}, "'atol' must be a finite number in [0, inf], got -1"),
        ({"max_rel": float("nan")}, "'max_rel' must be a finite number"),
        ({"rtol": float("inf")}, "'rtol' must be a finite number"),
        ({"cosine_min": 1.5}, "'cosine_min' must be a finite number in [0, 1]"),
        ({"top1_min": -0.1}, "'top1_min' must be a finite number in [0, 1]"),
        ({"fp16": {"split_top1_min": 2}}, "tolerances.fp16: 'split_top1_min' must be a finite number in [0, 1]"),
    ],
)
def test_tolerances_outside_their_range_are_input_errors(overrides, message):
    with pytest.raises(VitfoldError, match=message.replace("[", r"\[").replace("]", r"\]")):
        tolerances_for(overrides)


def test_a_tolerance_object_is_checked_too():
    with pytest.raises(VitfoldError, match="'atol' must be a finite number"):
        Tolerance(atol=float("nan"))
