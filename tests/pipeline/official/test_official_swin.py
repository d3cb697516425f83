"""`vitfold import-official` on Swin: checkpoints with the names and shapes of the official RLRR `models/swin.py`
and of the official EFFT `set_Swin_EFFT` (Microsoft-release / timm 0.5 layout, and timm 1.0 key names), built
here from a tiny timm Swin, against the official Swin forward written out below from the official files'
operations (window partition, cyclic shift and its -100 mask, relative position bias, the x0 x1 x2 x3 patch
merge, RLRRLinear, ssf_ada, Swin_EFFT_attn_forward / Swin_EFFT_mlp_forward), then folded, exported to ONNX
and verified."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

import vitfold
from vitfold.pipeline.backbones import load_folded
from vitfold.pipeline.config import load_config
from vitfold.pipeline.official import read_official
from vitfold.pipeline.stages import run_stage
from vitfold.pipeline.stages.import_official import import_official

from helpers import QUIET, make_vit, rel, vitfold_cli

SWIN = "swin_tiny_patch4_window7_224"
# tokens 16x16, 8x8, 4x4, 2x2 in windows of 4: the odd blocks of stages 0 and 1 shift their windows by 2
DEPTHS, HEADS, WINDOW, PATCH, IMG, EMBED = (2, 2, 4, 2), (1, 2, 2, 4), 4, 4, 64, 16
KW = {"img_size": IMG, "embed_dim": EMBED, "depths": DEPTHS, "num_heads": HEADS, "window_size": WINDOW}
CLASSES, SCALE = 5, 0.7
Tensor = torch.Tensor
Linear = Callable[[str, Tensor], Tensor]  # (official layer name, input) -> output


# -- the official Swin (timm 0.5 / Microsoft release layout), written out -----------------------------------


def relative_position_index(ws: int) -> Tensor:
    """WindowAttention.__init__'s index: (Δh + ws − 1) · (2ws − 1) + (Δw + ws − 1) for each token pair."""
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)  # [2, N]
    rel_ = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)  # [N, N, 2]
    return rel_[..., 0] * (2 * ws - 1) + rel_[..., 1]


def _partition(x: Tensor, ws: int) -> Tensor:
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, c)  # [b · windows, ws², c]


def _reverse(windows: Tensor, ws: int, h: int, w: int) -> Tensor:
    b = windows.shape[0] // (h * w // ws // ws)
    return windows.view(b, h // ws, w // ws, ws, ws, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, -1)


def shift_mask(h: int, w: int, ws: int, shift: int) -> Tensor:
    """SwinTransformerBlock.__init__'s attn_mask: region ids of the shifted image, -100 between regions."""
    img = torch.zeros(1, h, w, 1)
    cuts = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
    for i, (hs, wsl) in enumerate((a, b) for a in cuts for b in cuts):
        img[:, hs, wsl, :] = i
    ids = _partition(img, ws).squeeze(-1)  # [windows, ws²]
    diff = ids[:, None, :] - ids[:, :, None]
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


def _windows(i: int, j: int) -> tuple[int, int, int]:
    """(resolution, window, shift) of block j of stage i, as the official block clamps them."""
    res = IMG // PATCH >> i
    if res <= WINDOW:
        return res, res, 0
    return res, WINDOW, WINDOW // 2 if j % 2 else 0


def _ln(x: Tensor, s: dict[str, Tensor], name: str) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], s[name + ".weight"], s[name + ".bias"], eps=1e-5)


def official_swin_forward(
    s: dict[str, Tensor], x: Tensor, linear: Linear, ssf: Callable[[str, Tensor], Tensor]
) -> Tensor:
    """SwinTransformer.forward of the official files (eval mode); `linear` and `ssf` are the method's."""
    t = F.conv2d(x, s["patch_embed.proj.weight"], s["patch_embed.proj.bias"], stride=PATCH)
    t = _ln(t.flatten(2).transpose(1, 2), s, "patch_embed.norm")  # [B, HW, C]
    b = len(x)
    for i, depth in enumerate(DEPTHS):
        c, heads = EMBED << i, HEADS[i]
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            res, ws, shift = _windows(i, j)
            h = ssf(p + "norm1", _ln(t, s, p + "norm1")).view(b, res, res, c)
            if shift:
                h = torch.roll(h, (-shift, -shift), (1, 2))
            win = _partition(h, ws)
            n = ws * ws
            qkv = linear(p + "attn.qkv", win).reshape(-1, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            attn = (q * (c // heads) ** -0.5) @ k.transpose(-2, -1)
            table = s[p + "attn.relative_position_bias_table"]
            attn = attn + table[s[p + "attn.relative_position_index"].view(-1)].view(n, n, -1).permute(2, 0, 1)
            if shift:
                mask = s[p + "attn_mask"]
                attn = (attn.view(-1, len(mask), heads, n, n) + mask[None, :, None]).view(-1, heads, n, n)
            out = linear(p + "attn.proj", (attn.softmax(-1) @ v).transpose(1, 2).reshape(-1, n, c))
            h = _reverse(out.view(-1, ws, ws, c), ws, res, res)
            if shift:
                h = torch.roll(h, (shift, shift), (1, 2))
            t = t + h.reshape(b, res * res, c)
            t = t + linear(p + "mlp.fc2", F.gelu(linear(p + "mlp.fc1", ssf(p + "norm2", _ln(t, s, p + "norm2")))))
        if i < len(DEPTHS) - 1:
            d, h = f"layers.{i}.downsample.", t.view(b, res, res, c)
            merged = torch.cat([h[:, 0::2, 0::2], h[:, 1::2, 0::2], h[:, 0::2, 1::2], h[:, 1::2, 1::2]], -1)
            t = linear(d + "reduction", _ln(merged.view(b, -1, 4 * c), s, d + "norm"))
    t = ssf("norm", _ln(t, s, "norm")).mean(1)
    return t @ s["head.weight"].T + s["head.bias"]


def official_backbone(seed: int = 0) -> dict[str, Tensor]:
    """A tiny timm Swin's weights in the release layout, with the buffers the official model stores."""
    state = {}
    for key, value in make_vit(SWIN, seed=seed, **KW).state_dict().items():
        key = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", key)
        state[key.replace("head.fc.", "head.")] = value.clone()
    for i, depth in enumerate(DEPTHS):
        for j in range(depth):
            res, ws, shift = _windows(i, j)
            state[f"layers.{i}.blocks.{j}.attn.relative_position_index"] = relative_position_index(ws)
            if shift:
                state[f"layers.{i}.blocks.{j}.attn_mask"] = shift_mask(res, res, ws, shift)
    g = torch.Generator().manual_seed(seed + 7)
    state["head.weight"] = 0.3 * torch.randn(CLASSES, EMBED << 3, generator=g)
    state["head.bias"] = 0.3 * torch.randn(CLASSES, generator=g)
    return state


def timm1_names(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The same checkpoint with timm 1.0's key names (PatchMerging at the next stage's start, head.fc)."""
    out = {}
    for key, value in state.items():
        key = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", key)
        out[key.replace("head.", "head.fc.") if key.startswith("head.") else key] = value
    return out


def _inputs(batch: int = 3) -> Tensor:
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(5))


def in_float64(forward: Callable[[dict[str, Tensor], Tensor], Tensor], s: dict[str, Tensor], x: Tensor) -> Tensor:
    """The official forward in float64 (the reference; the model under test runs in float32)."""
    return forward({k: v.double() if v.is_floating_point() else v for k, v in s.items()}, x.double())


# -- RLRR: models/swin.py ---------------------------------------------------------------------------------

RLRR_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def official_rlrr_swin_state(seed: int = 3) -> dict[str, Tensor]:
    """The backbone plus non-identity RLRRLinear scales/shifts, ssf_* tensors, and the nn.Linear bias that
    RLRRLinear(bias=False) builds on each PatchMerging reduction and never reads."""
    g = torch.Generator().manual_seed(seed)
    state = official_backbone()

    def rlrr(name: str) -> None:
        out, inp = state[name + ".weight"].shape
        state[name + ".scale_col"] = 0.5 * torch.randn(1, inp, generator=g)
        state[name + ".scale_line"] = 0.5 * torch.randn(out, 1, generator=g)
        state[name + ".shift_bias"] = 0.1 * torch.randn(1, out, generator=g)

    def ssf(prefix: str, suffix: str, c: int) -> None:
        state[f"{prefix}ssf_scale_{suffix}"] = 1 + 0.2 * torch.randn(c, generator=g)
        state[f"{prefix}ssf_shift_{suffix}"] = 0.2 * torch.randn(c, generator=g)

    for i, depth in enumerate(DEPTHS):
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            for layer in RLRR_LINEARS:
                rlrr(p + layer)
            ssf(p, "norm1", EMBED << i)
            ssf(p, "norm2", EMBED << i)
        if i < len(DEPTHS) - 1:
            rlrr(f"layers.{i}.downsample.reduction")
            state[f"layers.{i}.downsample.reduction.bias"] = torch.randn(EMBED << (i + 1), generator=g)
    ssf("", "encode_norm", EMBED << 3)
    return state


def official_rlrr_swin_forward(s: dict[str, Tensor], x: Tensor) -> Tensor:
    def linear(name: str, h: Tensor) -> Tensor:  # RLRRLinear.forward
        w = s[name + ".weight"]
        weight = w * s[name + ".scale_line"] * s[name + ".scale_col"] + w
        bias = s[name + ".shift_bias"] if name.endswith("reduction") else s[name + ".bias"] + s[name + ".shift_bias"]
        return F.linear(h, weight, bias.reshape(-1))

    def ssf(norm: str, h: Tensor) -> Tensor:  # ssf_ada after norm1, norm2 and the final norm
        prefix, _, which = norm.rpartition(".")
        suffix = "encode_norm" if norm == "norm" else which
        key = f"{prefix}.ssf_{{}}_{suffix}" if prefix else f"ssf_{{}}_{suffix}"
        return h * s[key.format("scale")] + s[key.format("shift")]

    return official_swin_forward(s, x, linear, ssf)


def _no_adapter(s: dict[str, Tensor], x: Tensor) -> Tensor:
    return official_swin_forward(s, x, lambda n, h: F.linear(h, s[n + ".weight"], s.get(n + ".bias")), lambda n, h: h)


def _adapted_and_folded(path: Path, method: str, options: dict | None = None):
    """The library path: read_official -> adapt a timm Swin -> load the backbone and the adapter -> fold."""
    imported = read_official(method, path, options)
    model = make_vit(SWIN, **KW)
    model.load_state_dict(imported.backbone, strict=False)
    model = vitfold.adapt(model, method, num_classes=imported.num_classes, **imported.options)
    adapted = vitfold.load_adapter(model, imported.adapter).eval()
    return imported, adapted


@pytest.mark.parametrize("layout", ["release", "timm1"])
def test_official_rlrr_swin_checkpoint_is_the_official_function_after_the_fold(tmp_path, layout):
    state = official_rlrr_swin_state()
    torch.save(state if layout == "release" else timm1_names(state), tmp_path / "official.pth")
    x = _inputs()
    imported, adapted = _adapted_and_folded(tmp_path / "official.pth", "rlrr")
    assert imported.options["reduction_shift"] is True  # chosen because the checkpoint has the shifts
    assert any("reduction_shift=true" in note for note in imported.notes)
    assert any("3 PatchMerging 'reduction.bias'" in note for note in imported.notes)  # the unused biases
    with torch.no_grad():
        expected = in_float64(official_rlrr_swin_forward, state, x)
        assert rel(_no_adapter(state, x), expected) > 0.1  # the adapter matters: the test can fail
        assert rel(adapted(x), expected) < 1e-5
        assert rel(vitfold.fold(adapted)(x), expected) < 1e-5


# -- EFFT: set_Swin_EFFT -------------------------------------------------------------------------------------

RANK = 16  # the last stage's attention rank: stages 2, 4, 8, 16; FFN r1 = rank / 2 per stage, r2 = 2 r1
FFN_SLICES = (2, 2, 5, 2)  # the released code gives stage 3 more FFN core slices than it reads (18 on Swin-B)


def official_efft_swin_state(seed: int = 4) -> dict[str, Tensor]:
    """timm 0.5's Swin after set_Swin_EFFT: root factors EFFT_{s}_{attn,mlp}_{u,c,v} (slice axis first) and their
    per-block aliases; non-identity values (no factor zero)."""
    g = torch.Generator().manual_seed(seed)
    state = official_backbone()
    for i in range(len(DEPTHS)):
        c, r = EMBED << i, RANK >> (len(DEPTHS) - 1 - i)
        r1 = r // 2
        shapes = {"attn_u": (c, r), "attn_c": (4, r, r), "attn_v": (r, c)}
        shapes |= {"mlp_u": (c, r1), "mlp_c": (FFN_SLICES[i], r1, 2 * r1), "mlp_v": (2 * r1, 4 * c)}
        for name, shape in shapes.items():
            state[f"EFFT_{i + 1}_{name}"] = 0.4 * torch.randn(*shape, generator=g)
        for j in range(DEPTHS[i]):
            for part in ("attn", "mlp"):
                for f in "ucv":
                    state[f"layers.{i}.blocks.{j}.{part}.EFFT_{f}"] = state[f"EFFT_{i + 1}_{part}_{f}"]
    return state


def official_efft_swin_forward(s: dict[str, Tensor], x: Tensor) -> Tensor:
    """Swin_EFFT_attn_forward / Swin_EFFT_mlp_forward: deltas u c[j] v added in activation space, times s."""

    def linear(name: str, h: Tensor) -> Tensor:
        base = F.linear(h, s[name + ".weight"], s.get(name + ".bias"))
        m = re.fullmatch(r"layers\.(\d+)\.blocks\.\d+\.(attn|mlp)\.(qkv|proj|fc1|fc2)", name)
        if m is None:  # the PatchMerging reduction: not adapted
            return base
        stage, part, layer = int(m.group(1)) + 1, m.group(2), m.group(3)
        u, c, v = (s[f"EFFT_{stage}_{part}_{f}"] for f in "ucv")
        if layer == "qkv":
            return base + torch.cat([h @ (u @ c[j] @ v) for j in range(3)], -1) * SCALE
        if layer == "proj":
            return base + h @ (u @ c[3] @ v) * SCALE
        return base + h @ (u @ c[0] @ v if layer == "fc1" else (u @ c[1] @ v).T) * SCALE

    return official_swin_forward(s, x, linear, lambda n, h: h)


def test_official_efft_swin_checkpoint_is_the_official_function_after_the_fold(tmp_path):
    state = official_efft_swin_state()
    torch.save({"epoch": 9, "model_state_dict": state, "best_acc": 50.0}, tmp_path / "official.pth")
    x = _inputs()
    imported, adapted = _adapted_and_folded(tmp_path / "official.pth", "efft2", {"scale": SCALE})
    assert imported.options == {"rank": 16, "ffn_rank": 8, "ffn_rank2": 16, "core": "shared", "scale": SCALE}
    assert imported.notes == ("dropped core slices the released forward never reads: EFFT_3_mlp_c[2:5] (96 values)",)
    with torch.no_grad():
        expected = in_float64(official_efft_swin_forward, state, x)
        assert rel(_no_adapter(state, x), expected) > 1e-2
        assert rel(adapted(x), expected) < 1e-5
        assert rel(vitfold.fold(adapted)(x), expected) < 1e-5
    official = sum(t.numel() for k, t in state.items() if re.fullmatch(r"EFFT_\d_\w+", k))
    assert vitfold.parameter_counts(adapted)["adapter_params"] == official - 96


# -- the runs: import -> fold -> export ONNX -> verify ------------------------------------------------------


def _verify_onnx(run: Path, expected: Tensor, x: Tensor) -> None:
    run_stage("fold", run, **QUIET)
    run_stage("export", run, formats=["onnx"], **QUIET)
    report = run_stage("verify", run, batch_sizes=[1, 3], samples=3, eval_images=8, **QUIET)
    assert report["passed"]
    onnx_rows = [r for r in report["results"] if r["backend"] == "onnxruntime"]
    assert onnx_rows and all(r["max_rel"] < 1e-4 for r in onnx_rows)  # float32 noise
    folded = load_folded(run / "fold" / "model.safetensors", SWIN, CLASSES, KW)
    with torch.no_grad():
        assert rel(folded(x), expected) < 1e-5


def test_cli_imports_an_rlrr_swin_adapter_file_then_fold_export_verify(tmp_path):
    """Only the head, scale and shift tensors (as the official train_vtab.py saves), the backbone given."""
    state = official_rlrr_swin_state()
    saved = {k: v for k, v in state.items() if any(w in k for w in ("head", "scale", "shift"))}
    torch.save(saved, tmp_path / "dtd.pth")
    backbone = {k: v for k, v in timm1_names(official_backbone()).items() if not k.startswith("head.")}
    torch.save(backbone, tmp_path / "backbone.pth")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"backbone": SWIN, "backbone_kwargs": KW, "data": "digits:0-4"}))
    args = ["import-official", "--method", "rlrr", str(tmp_path / "dtd.pth"), "--config", str(tmp_path / "run.yaml")]
    result = vitfold_cli(*args, "--checkpoint", str(tmp_path / "backbone.pth"), "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    assert "reduction_shift=true" in result.stdout + result.stderr
    info = vitfold_cli("info", "--run", str(tmp_path / "run"), "--json")  # the run's model: every official tensor
    assert info.returncode == 0, info.stderr
    official_adapter = sum(t.numel() for k, t in saved.items() if not k.startswith("head"))
    assert json.loads(info.stdout)["adapter_params"] == official_adapter
    x = _inputs()
    _verify_onnx(tmp_path / "run", in_float64(official_rlrr_swin_forward, state, x), x)
    folded = load_file(str(tmp_path / "run" / "fold" / "model.safetensors"))
    assert sorted(k for k in folded if k.endswith("reduction.bias")) == [
        f"layers.{i}.downsample.reduction.bias" for i in (1, 2, 3)
    ]


def test_efft_swin_import_carries_its_backbone_then_fold_export_verify(tmp_path):
    state = official_efft_swin_state()
    torch.save({"epoch": 9, "model_state_dict": state}, tmp_path / "official.pth")
    cfg = load_config(
        None, backbone=SWIN, backbone_kwargs=KW, data="digits:0-4", method="efft2", method_options={"scale": SCALE}
    )
    lines: list[str] = []
    import_official("efft2", tmp_path / "official.pth", tmp_path / "run", cfg, log=lines.append)
    assert any("EFFT_3_mlp_c[2:5]" in line for line in lines)
    x = _inputs()
    _verify_onnx(tmp_path / "run", in_float64(official_efft_swin_forward, state, x), x)


# -- EFFT core init in the released layout --------------------------------------------------------------------


def _official_core_std(k: int, r1: int, r2: int) -> float:
    """std of nn.init.xavier_uniform_ on torch.zeros([k, r1, r2]) (fan_in = r1·r2, fan_out = k·r2): bound / √3."""
    return (6 / (r1 * r2 + k * r2)) ** 0.5 / 3**0.5


def test_efft_swin_cores_start_with_the_released_spread():
    """set_Swin_EFFT draws EFFT_{s}_attn_c [4, r, r] and EFFT_{s}_mlp_c [2, r1, 2 r1] with Xavier-uniform; vitfold's
    [r, r, 4] / [r1, r2, 2] cores (shared) must have the per-core std of that formula, not of their own shape's
    (which is 2.1x larger for the attention core at r = 32)."""
    torch.manual_seed(0)
    wide = {**KW, "embed_dim": 32}
    model = vitfold.adapt(make_vit(SWIN, **wide), "efft2", rank=64, ffn_rank=32, ffn_rank2=64, core="shared")
    for stage, (r, r1) in ((3, (64, 32)), (2, (32, 16))):
        factors = model.layers[stage].efft
        assert float(factors.C1.detach().std()) == pytest.approx(_official_core_std(4, r, r), rel=0.06)
        assert float(factors.C2.detach().std()) == pytest.approx(_official_core_std(2, r1, 2 * r1), rel=0.06)
        stored_layout = (6 / (r * 4 + r * 4)) ** 0.5 / 3**0.5  # what drawing on [r, r, 4] gives
        assert stored_layout / _official_core_std(4, r, r) > 1.5  # far apart: the test tells them apart
    vit = vitfold.adapt(
        make_vit("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2), "efft2", rank=64, core="shared"
    )
    # the released ViT code draws EFFTc1 on [r, r, 4] itself: fan_in = fan_out = 4r
    assert float(vit.efft.C1.detach().std()) == pytest.approx((6 / (8 * 64)) ** 0.5 / 3**0.5, rel=0.06)


# -- Swin-B: the counts of what the import chose --------------------------------------------------------------

SWIN_B = ("swin_base_patch4_window7_224", (128, 256, 512, 1024), (2, 2, 18, 2))


def test_swin_b_imports_count_the_official_parameters(tmp_path):
    """Official-layout Swin-B files (adapter tensors and head only: a Swin-B backbone is 350 MB): the options the
    import picks give 358,144 for RLRR (with the reduction shift) and the released 291,728 less the 2,048
    never-read core values for EFFT (set_Swin_EFFT, dim 2)."""
    name, widths, depths = SWIN_B
    rlrr, efft = {}, {}
    for s, (c, depth) in enumerate(zip(widths, depths, strict=True)):
        for b in range(depth):
            p = f"layers.{s}.blocks.{b}."
            for layer, (out, inp) in {"attn.qkv": (3 * c, c), "attn.proj": (c, c), "mlp.fc1": (4 * c, c)}.items():
                rlrr |= {p + layer + ".scale_line": torch.ones(out, 1), p + layer + ".scale_col": torch.ones(1, inp)}
                rlrr[p + layer + ".shift_bias"] = torch.zeros(1, out)
            rlrr |= {p + "mlp.fc2.scale_line": torch.ones(c, 1), p + "mlp.fc2.scale_col": torch.ones(1, 4 * c)}
            rlrr[p + "mlp.fc2.shift_bias"] = torch.zeros(1, c)
            rlrr |= {p + f"ssf_{k}_norm{n}": torch.ones(c) for k in ("scale", "shift") for n in (1, 2)}
        if s < 3:
            p = f"layers.{s}.downsample.reduction."
            rlrr |= {p + "scale_line": torch.ones(2 * c, 1), p + "scale_col": torch.ones(1, 4 * c)}
            rlrr[p + "shift_bias"] = torch.zeros(1, 2 * c)
        r = 2 * 2 << s  # dim 2: attention 4/8/16/32, FFN r1 2..16, r2 = 2 r1
        efft |= {f"EFFT_{s + 1}_attn_u": torch.ones(c, r), f"EFFT_{s + 1}_attn_c": torch.ones(4, r, r)}
        efft[f"EFFT_{s + 1}_attn_v"] = torch.ones(r, c)
        k = 18 if s == 2 else 2
        efft |= {f"EFFT_{s + 1}_mlp_u": torch.ones(c, r // 2), f"EFFT_{s + 1}_mlp_c": torch.ones(k, r // 2, r)}
        efft[f"EFFT_{s + 1}_mlp_v"] = torch.ones(r, 4 * c)
    rlrr |= {"ssf_scale_encode_norm": torch.ones(1024), "ssf_shift_encode_norm": torch.zeros(1024)}
    head = {"head.weight": torch.zeros(10, 1024), "head.bias": torch.zeros(10)}
    assert sum(t.numel() for t in efft.values()) == 291_728  # the released count
    torch.save(rlrr | head, tmp_path / "rlrr.pth")
    torch.save({"model_state_dict": efft | head}, tmp_path / "efft.pth")
    for method, path, expected in (("rlrr", "rlrr.pth", 358_144), ("efft2", "efft.pth", 291_728 - 2_048)):
        imported = read_official(method, tmp_path / path, {"scale": 1.0} if method == "efft2" else None)
        with torch.device("meta"):
            model = vitfold.adapt(make_vit(name), method, num_classes=10, **imported.options)
        assert vitfold.parameter_counts(model)["adapter_params"] == expected, method
        assert sum(t.numel() for k, t in imported.adapter.items() if not k.startswith("head")) == expected
