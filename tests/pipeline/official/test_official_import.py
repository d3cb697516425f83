"""`vitfold import-official`: checkpoints with the official codes' names and shapes, built here, against the
official forward written out below from the papers' formulas (RLRR Eq. 16/20 and SSF; EFFT2's factors
added in activation space as the official `ViT_EFFT_forward_attn/mlp` do), then folded, exported, verified."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from click.testing import CliRunner

import vitfold
from vitfold.cli import main
from vitfold.errors import CheckpointError
from vitfold.pipeline.config import load_config
from vitfold.pipeline.official import read_official
from vitfold.pipeline.stages import RunDir, run_stage
from vitfold.pipeline.stages.import_official import import_official
from vitfold.pipeline.stages.manifest import staleness
from vitfold.pipeline.stages.train import TRAIN

from helpers import QUIET, images, make_vit, rel
from official_states import CLASSES, DEPTH, HEADS, KWARGS, NAME, PATCH, SCALE, official_efft_state

Tensor = torch.Tensor


def _ln(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], w, b, eps=1e-6)


def _attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q kᵀ / √d_h) v per head, heads split off the feature axis as both codes do."""
    b, n, d = q.shape
    q, k, v = (t.view(b, n, HEADS, d // HEADS).transpose(1, 2) for t in (q, k, v))  # [b, h, n, d_h]
    probs = (q @ k.transpose(-1, -2) / math.sqrt(d // HEADS)).softmax(-1)
    return (probs @ v).transpose(1, 2).reshape(b, n, d)


def vit_reference(
    x: Tensor,
    tokens: Callable[[Tensor], Tensor],
    cls: Tensor,
    pos: Tensor,
    norm: Callable[[str, Tensor], Tensor],
    linear: Callable[[int, str, Tensor], Tensor],
    head: Callable[[Tensor], Tensor],
) -> Tensor:
    """A pre-LN ViT in eval mode: cat(cls, patch tokens) + pos, blocks t += o(attn(q, k, v)(norm1 t)),
    t += fc2(gelu(fc1(norm2 t))), the class token of the final norm into the head."""
    t = torch.cat([cls.expand(len(x), -1, -1), tokens(x)], 1) + pos
    for i in range(DEPTH):
        h = norm(f"{i}.attn", t)
        t = t + linear(i, "o", _attention(*(linear(i, name, h) for name in "qkv")))
        t = t + linear(i, "fc2", F.gelu(linear(i, "fc1", norm(f"{i}.ffn", t))))
    return head(norm("final", t)[:, 0])


# -- RLRR: the official names of models/networks.py -----------------------------------------------------

UNITS = {"q": "attn.query", "k": "attn.key", "v": "attn.value", "o": "attn.out", "fc1": "ffn.fc1", "fc2": "ffn.fc2"}


def official_rlrr_state(seed: int = 3) -> dict[str, Tensor]:
    """A full official RLRRVisionTransformer state_dict: the backbone of the tiny timm ViT under the official
    names (qkv split into query, key, value) and random, non-identity RLRR/SSF tensors and head."""
    g = torch.Generator().manual_seed(seed)
    base = make_vit(NAME, **KWARGS).state_dict()
    state = {
        "transformer.embeddings.patch_embeddings.weight": base["patch_embed.proj.weight"],
        "transformer.embeddings.patch_embeddings.bias": base["patch_embed.proj.bias"],
        "transformer.embeddings.cls_token": base["cls_token"],
        "transformer.embeddings.position_embeddings": base["pos_embed"],
        "transformer.encoder.encoder_norm.weight": base["norm.weight"],
        "transformer.encoder.encoder_norm.bias": base["norm.bias"],
    }

    def ssf(name: str, d: int) -> None:
        state[name.format("scale")] = 1 + 0.2 * torch.randn(d, generator=g)
        state[name.format("shift")] = 0.2 * torch.randn(d, generator=g)

    ssf("transformer.embeddings.ssf_{}_patch", 192)
    ssf("transformer.encoder.ssf_{}_enc_norm", 192)
    for i in range(DEPTH):
        p, t = f"transformer.encoder.layer.{i}.", f"blocks.{i}."
        qkv_w, qkv_b = base[t + "attn.qkv.weight"].chunk(3), base[t + "attn.qkv.bias"].chunk(3)
        weights = dict(zip("qkv", zip(qkv_w, qkv_b, strict=True), strict=True))
        weights |= {
            u: (base[f"{t}{n}.weight"], base[f"{t}{n}.bias"])
            for u, n in (("o", "attn.proj"), ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2"))
        }
        for unit, (w, b) in weights.items():
            out, inp = w.shape
            state |= {f"{p}{UNITS[unit]}.mlp.weight": w, f"{p}{UNITS[unit]}.mlp.bias": b}
            state[f"{p}{UNITS[unit]}.scale_col"] = 0.5 * torch.randn(1, inp, generator=g)
            state[f"{p}{UNITS[unit]}.scale_line"] = 0.5 * torch.randn(out, 1, generator=g)
            state[f"{p}{UNITS[unit]}.shift_bias"] = 0.1 * torch.randn(1, out, generator=g)
        for norm, timm_norm in (("attention_norm", "norm1"), ("ffn_norm", "norm2")):
            state |= {
                f"{p}{norm}.weight": base[f"{t}{timm_norm}.weight"],
                f"{p}{norm}.bias": base[f"{t}{timm_norm}.bias"],
            }
        ssf(p + "ssf_{}_attn_norm", 192)
        ssf(p + "ssf_{}_ffn_norm", 192)
    state["head.weight"] = 0.3 * torch.randn(CLASSES, 192, generator=g)
    state["head.bias"] = 0.3 * torch.randn(CLASSES, generator=g)
    return state


def official_rlrr_forward(s: dict[str, Tensor], x: Tensor) -> Tensor:
    """RLRRVisionTransformer.forward: W' = W ⊙ scale_col ⊙ scale_line + W, b' = b + shift_bias; SSF x·γ + β."""
    e, enc = "transformer.embeddings.", "transformer.encoder."

    def tokens(x: Tensor) -> Tensor:
        t = F.conv2d(x, s[e + "patch_embeddings.weight"], s[e + "patch_embeddings.bias"], stride=PATCH)
        return t.flatten(2).transpose(1, 2) * s[e + "ssf_scale_patch"] + s[e + "ssf_shift_patch"]

    def norm(where: str, t: Tensor) -> Tensor:
        if where == "final":
            ln, ssf = enc + "encoder_norm", enc + "ssf_{}_enc_norm"
        else:
            block, kind = where.split(".")
            ln = f"{enc}layer.{block}.{'attention' if kind == 'attn' else 'ffn'}_norm"
            ssf = f"{enc}layer.{block}.ssf_{{}}_{kind}_norm"
        return _ln(t, s[ln + ".weight"], s[ln + ".bias"]) * s[ssf.format("scale")] + s[ssf.format("shift")]

    def linear(i: int, unit: str, h: Tensor) -> Tensor:
        p = f"{enc}layer.{i}.{UNITS[unit]}."
        w = s[p + "mlp.weight"]
        return h @ (w * s[p + "scale_col"] * s[p + "scale_line"] + w).T + s[p + "mlp.bias"] + s[p + "shift_bias"]

    cls, pos = s[e + "cls_token"], s[e + "position_embeddings"]
    return vit_reference(x, tokens, cls, pos, norm, linear, lambda t: t @ s["head.weight"].T + s["head.bias"])


def saved_by_train_vtab(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """What the official train_vtab.py `save_model` keeps: the tensors named head, scale or shift."""
    return {k: v for k, v in state.items() if any(word in k for word in ("head", "scale", "shift"))}


# -- EFFT2: timm names plus the factors of methods/Set_EFFT.py ------------------------------------------


def official_efft_forward(s: dict[str, Tensor], x: Tensor, per_layer: bool) -> Tensor:
    """qkv += cat(x@q, x@k, x@v)·s, proj += (x@o)·s with q.. = U1 C1[..., j] V1; fc1 += (x @ U2 C2[..., 0] V2)·s,
    fc2 += (x @ (U2 C2[..., 1] V2)ᵀ)·s (core index 4l+j and 2l+k per layer)."""

    def tokens(x: Tensor) -> Tensor:
        return (
            F.conv2d(x, s["patch_embed.proj.weight"], s["patch_embed.proj.bias"], stride=PATCH)
            .flatten(2)
            .transpose(1, 2)
        )

    def norm(where: str, t: Tensor) -> Tensor:
        name = "norm" if where == "final" else f"blocks.{where.split('.')[0]}.norm{1 if where.endswith('attn') else 2}"
        return _ln(t, s[name + ".weight"], s[name + ".bias"])

    def linear(i: int, unit: str, h: Tensor) -> Tensor:
        attn = unit in ("q", "k", "v", "o")
        j = "qkvo".index(unit) if attn else ("fc1", "fc2").index(unit)
        n = "1" if attn else "2"
        core = s[f"EFFTc{n}"][:, :, (4 * i if attn else 2 * i) * per_layer + j]
        delta = s[f"EFFTu{n}"] @ core @ s[f"EFFTv{n}"]
        delta = delta.T if unit == "fc2" else delta
        layer = {"o": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}.get(unit, "attn.qkv")
        w, b = s[f"blocks.{i}.{layer}.weight"], s[f"blocks.{i}.{layer}.bias"]
        if layer == "attn.qkv":
            w, b = w.chunk(3)["qkv".index(unit)], b.chunk(3)["qkv".index(unit)]
        return h @ w.T + b + (h @ delta) * SCALE

    return vit_reference(
        x, tokens, s["cls_token"], s["pos_embed"], norm, linear, lambda t: t @ s["head.weight"].T + s["head.bias"]
    )


def _inputs() -> Tensor:
    return images(make_vit(NAME, **KWARGS), 4)


def _imported_folded(method: str, path: Path, options: dict | None = None, backbone: dict | None = None):
    """The library path: read_official -> adapt a timm ViT -> load_adapter -> fold."""
    imported = read_official(method, path, options)
    model = make_vit(NAME, **KWARGS)
    model.load_state_dict(backbone or imported.backbone, strict=False)
    model = vitfold.adapt(model, method, num_classes=imported.num_classes, **imported.options)
    return vitfold.fold(vitfold.load_adapter(model, imported.adapter).eval())


def test_full_official_rlrr_state_dict_folds_to_the_official_function(tmp_path):
    state = official_rlrr_state()
    torch.save(state, tmp_path / "official.pth")
    x = _inputs()
    with torch.no_grad():
        expected = official_rlrr_forward(state, x)
        got = _imported_folded("rlrr", tmp_path / "official.pth")(x)
        plain = make_vit(NAME, **KWARGS)
        plain.reset_classifier(CLASSES)
        plain.load_state_dict({"head.weight": state["head.weight"], "head.bias": state["head.bias"]}, strict=False)
        assert rel(plain(x), expected) > 0.1  # the adapter matters: the test can fail
    assert rel(got, expected) < 1e-5


@pytest.mark.parametrize("per_layer", [False, True], ids=["shared-core", "per-layer-cores"])
def test_official_efft_checkpoint_folds_to_the_official_function(tmp_path, per_layer):
    state = official_efft_state(per_layer)
    torch.save({"epoch": 9, "model_state_dict": state, "best_acc": 50.0}, tmp_path / "official.pth")
    x = _inputs()
    with torch.no_grad():
        expected = official_efft_forward(state, x, per_layer)
        got = _imported_folded("efft2", tmp_path / "official.pth", {"scale": SCALE})(x)
        assert rel(official_efft_forward({**state, "EFFTc1": 0 * state["EFFTc1"]}, x, per_layer), expected) > 1e-2
    assert rel(got, expected) < 1e-5
    imported = read_official("efft2", tmp_path / "official.pth", {"scale": SCALE})
    assert imported.options["core"] == ("layer" if per_layer else "shared")  # trains on as the checkpoint did


def test_official_checkpoint_errors_are_one_line(tmp_path):
    torch.save({"epoch": 1, "model_state_dict": official_efft_state(False)}, tmp_path / "efft.pth")
    with pytest.raises(CheckpointError, match="-o scale=S"):
        read_official("efft2", tmp_path / "efft.pth")
    torch.save({**saved_by_train_vtab(official_rlrr_state()), "transformer.extra": torch.zeros(1)}, tmp_path / "r.pth")
    with pytest.raises(CheckpointError, match="'transformer.extra' is not part of an official rlrr checkpoint"):
        read_official("rlrr", tmp_path / "r.pth")
    torch.save(saved_by_train_vtab(official_rlrr_state()), tmp_path / "rlrr.pth")
    with pytest.raises(CheckpointError, match="holds no backbone weights.*--pretrained"):
        import_official("rlrr", tmp_path / "rlrr.pth", tmp_path / "run", load_config(None, backbone=NAME), **QUIET)
    assert not (tmp_path / "run" / "config.yaml").exists()


def _verified(run: Path, official: Tensor, x: Tensor) -> None:
    """fold, export (TorchScript, the quickest), verify: the gate passes; the fold computes the official logits."""
    run_stage("fold", run, **QUIET)
    run_stage("export", run, formats=["torchscript"], **QUIET)
    assert run_stage("verify", run, batch_sizes=[2], samples=2, eval_images=8, **QUIET)["passed"]
    from safetensors.torch import load_file

    folded = make_vit(NAME, num_classes=CLASSES, **KWARGS)
    folded.load_state_dict(load_file(run / "fold" / "model.safetensors"))
    with torch.no_grad():
        assert rel(folded(x), official) < 1e-5


def test_cli_imports_what_train_vtab_saved_then_fold_export_verify(tmp_path):
    """The acceptance path for RLRR: head/scale/shift only (as train_vtab.py saves), the backbone given."""
    state = official_rlrr_state()
    torch.save(saved_by_train_vtab(state), tmp_path / "cifar 91.20.pth")
    torch.save(make_vit(NAME, **KWARGS).state_dict(), tmp_path / "backbone.pth")  # the weights it started from
    config = {"backbone": NAME, "backbone_kwargs": KWARGS, "data": "digits:0-4"}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    args = [
        "import-official",
        "--method",
        "rlrr",
        str(tmp_path / "cifar 91.20.pth"),
        "--config",
        str(tmp_path / "run.yaml"),
    ]
    result = CliRunner().invoke(
        main, [*args, "--checkpoint", str(tmp_path / "backbone.pth"), "--out", str(tmp_path / "run")]
    )
    assert result.exit_code == 0, result.output
    x = _inputs()
    _verified(tmp_path / "run", official_rlrr_forward(state, x), x)


def test_efft_import_carries_its_backbone_into_the_run_then_fold_export_verify(tmp_path):
    state = official_efft_state(per_layer=False)
    torch.save({"epoch": 9, "model_state_dict": state, "best_acc": 50.0}, tmp_path / "official.pth")
    options = {"method": "efft2", "method_options": {"scale": SCALE}}
    cfg = load_config(None, backbone=NAME, backbone_kwargs=KWARGS, data="digits:0-4", **options)
    import_official("efft2", tmp_path / "official.pth", tmp_path / "run", cfg, **QUIET)
    assert (tmp_path / "run" / "import" / "backbone.safetensors").is_file()
    rd = RunDir(tmp_path / "run")  # recorded as the train stage's output: `vitfold run` would not retrain it
    assert staleness(rd, "train", TRAIN.inputs(rd, rd.config), TRAIN.params(rd.config)) is None
    x = _inputs()
    _verified(tmp_path / "run", official_efft_forward(state, x, per_layer=False), x)
