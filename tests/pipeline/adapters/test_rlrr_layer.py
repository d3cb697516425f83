"""RLRR and SSF layers against the paper's activation-space form, written out here.

Paper Eq. 16 in x·W orientation: y = x(W + s_left ⊙ W ⊙ s_rightᵀ) + b + f, i.e. for nn.Linear
y = x Wᵀ + ((x ⊙ s_in) Wᵀ) ⊙ s_out + b + f, with q, k, v each using its own s_in.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vitfold.pipeline.adapters.rlrr import SSF, RLRRLinear, RLRROptions


def test_rlrr_linear_matches_activation_space_form_per_qkv_block():
    torch.manual_seed(0)
    d = 6
    layer = RLRRLinear(nn.Linear(d, 3 * d), groups=3, opts=RLRROptions()).double()
    with torch.no_grad():
        layer.f.normal_()
    x = torch.randn(2, 5, d, dtype=torch.float64)
    w, b = layer.base.weight, layer.base.bias
    parts = []
    for i in range(3):  # q, k, v blocks of the fused projection
        rows = slice(i * d, (i + 1) * d)
        scaled = (x * layer.s_in[i]) @ w[rows].T
        parts.append(x @ w[rows].T + scaled * layer.s_out[rows] + b[rows] + layer.f[rows])
    expected = torch.cat(parts, dim=-1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    assert layer.s_in.shape == (3, d) and layer.s_out.shape == (3 * d,)


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("scales", ["both", "left", "right"])
def test_rlrr_ablations_match_the_activation_space_form(scales, residual):
    """RLRR Table 6: y = r·x Wᵀ + ((x ⊙ s_left) Wᵀ) ⊙ s_right + b + f, r = 1 with the residual term, else 0,
    and a scale that is not trained taken as ones (s_left is vitfold's s_in, s_right its s_out)."""
    torch.manual_seed(0)
    d = 6
    layer = RLRRLinear(nn.Linear(d, 3 * d), groups=3, opts=RLRROptions(scales=scales, residual=residual)).double()
    with torch.no_grad():
        for p in layer.adapter_named_parameters():
            p[1].normal_()
    assert (layer.s_in is not None) == (scales != "right") and (layer.s_out is not None) == (scales != "left")
    x = torch.randn(2, 5, d, dtype=torch.float64)
    w, b = layer.base.weight, layer.base.bias
    s_in = layer.s_in if layer.s_in is not None else torch.ones(3, d, dtype=torch.float64)
    s_out = layer.s_out if layer.s_out is not None else torch.ones(3 * d, dtype=torch.float64)
    parts = []
    for i in range(3):
        rows = slice(i * d, (i + 1) * d)
        scaled = ((x * s_in[i]) @ w[rows].T) * s_out[rows]
        parts.append(float(residual) * (x @ w[rows].T) + scaled + b[rows] + layer.f[rows])
    torch.testing.assert_close(layer(x), torch.cat(parts, dim=-1), rtol=1e-12, atol=1e-12)
    fused = layer.fuse()
    torch.testing.assert_close(fused(x), layer(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scales", ["both", "left", "right"])
def test_rlrr_identity_init_is_the_base_in_every_ablation(scales):
    for residual in (True, False):
        base = nn.Linear(6, 18).double()
        opts = RLRROptions(init="identity", scales=scales, residual=residual)
        layer = RLRRLinear(base, groups=3, opts=opts).double()
        x = torch.randn(4, 6, dtype=torch.float64)
        torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)


def test_ssf_on_conv_output_equals_ssf_on_patch_tokens():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, kernel_size=4, stride=4).double()
    layer = SSF(conv, init="paper").double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    tokens = conv(x).flatten(2).transpose(1, 2)  # [B, N, C]: timm's patch tokens
    expected = tokens * layer.scale + layer.shift
    torch.testing.assert_close(layer(x).flatten(2).transpose(1, 2), expected, rtol=1e-12, atol=1e-12)


def test_ssf_after_layernorm():
    torch.manual_seed(0)
    norm = nn.LayerNorm(8).double()
    with torch.no_grad():  # an affine that is not the identity, so that b ⊙ γ + β differs from β
        norm.weight.normal_(1.0, 0.3)
        norm.bias.normal_(0.0, 0.3)
    layer = SSF(norm, init="paper").double()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    torch.testing.assert_close(layer(x), norm(x) * layer.scale + layer.shift, rtol=1e-12, atol=1e-12)
