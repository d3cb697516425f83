"""`vitfold import-peft`: LoRA adapters trained and saved by Hugging Face PEFT itself on a tiny timm ViT or Swin
(every trained tensor drawn away from PEFT's init, B non-zero), imported, folded, exported and verified, and
compared with PEFT's own forward and with its `merge_and_unload()`: the reference is PEFT, not vitfold's reading
of it. Refusals: one line naming the key, exit 2, no run directory."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from click.testing import CliRunner
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from vitfold.cli import main
from vitfold.pipeline.peft_import import default_backbone
from vitfold.pipeline.stages import RunDir
from vitfold.pipeline.stages.manifest import staleness
from vitfold.pipeline.stages.train import TRAIN

from helpers import TINY_SWIN, TINY_VITS, images, make_vit, randomize_trainable, vitfold_cli

NAME, KWARGS = TINY_VITS["run"]  # 16x16 input, patch 4, depth 2, width 192
BACKBONES = {"vit": (NAME, KWARGS), "swin": TINY_SWIN}
CLASSES = 5

# one row per PEFT setup: LoraConfig keyword arguments, the spellings PEFT users write for timm ViTs
CASES: dict[str, dict[str, Any]] = {
    # short names, the head trained (modules_to_save), per-module rank and alpha: a scale per layer
    "short-names-head-patterns": {
        "target_modules": ["qkv", "fc2"],
        "r": 4,
        "lora_alpha": 8,
        "modules_to_save": ["head"],
        "rank_pattern": {"blocks.1.attn.qkv": 2},
        "alpha_pattern": {"fc2": 3},
    },
    # a regex over all four linears, rsLoRA (s = α/√r), the base model's own head
    "regex-all-four-rslora": {
        "target_modules": r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc\d)",
        "r": 4,
        "lora_alpha": 6,
        "use_rslora": True,
    },
    # full module names, one layer each of two blocks; the rest stay the base
    "full-names-two-layers": {"target_modules": ["blocks.0.mlp.fc1", "blocks.1.attn.proj"], "r": 2, "lora_alpha": 16},
    # the four linears by their short names: "proj" also takes timm's patch_embed.proj (an nn.Conv2d), whose LoRA
    # merges into the run's base weights
    "short-names-with-patch-embedding": {"target_modules": ["qkv", "proj", "fc1", "fc2"], "r": 3, "lora_alpha": 4},
    # trained base biases, LoRA biases (b + s b_B) and a saved final norm replace or add to the base's tensors
    "biases-and-a-saved-norm": {
        "target_modules": ["qkv", "fc1"],
        "r": 2,
        "lora_alpha": 4,
        "bias": "lora_only",
        "lora_bias": True,
        "modules_to_save": ["norm"],
    },
    "all-biases": {"target_modules": ["proj"], "r": 2, "lora_alpha": 4, "bias": "all"},
    # PEFT's shorthand: every nn.Linear of a timm ViT, the head too (LoRA on the head folds into vitfold's head)
    "all-linear": {"target_modules": "all-linear", "r": 3, "lora_alpha": 5, "rank_pattern": {"head": 2}},
}
SWIN_CASES = {  # Swin: "all-linear" also takes the bias-free patch-merging reductions and head.fc (merged)
    "swin-all-linear": {"target_modules": "all-linear", "r": 2, "lora_alpha": 3},
    "swin-short-names-head-fc": {
        "target_modules": ["qkv", "proj", "fc1", "fc2"],
        "r": 2,
        "lora_alpha": 5,
        "modules_to_save": ["head.fc"],
    },
}


def saved_peft(tmp_path: Path, safe: bool = True, family: str = "vit", **lora: Any) -> tuple[torch.nn.Module, Path]:
    """A PEFT LoRA model on the tiny ViT (or Swin; its base weights saved as tmp_path/base.safetensors), every
    trainable tensor (A, B, a saved head ...) drawn at random, written with save_pretrained to tmp_path/peft
    (adapter_model.safetensors, or with `safe=False` the pickled adapter_model.bin)."""
    base = make_vit(BACKBONES[family][0], num_classes=CLASSES, **BACKBONES[family][1])
    save_file(base.state_dict(), tmp_path / "base.safetensors")
    model = get_peft_model(base, LoraConfig(**lora))
    randomize_trainable(model, seed=5, std=0.05)  # B leaves PEFT's zero init: the adapter changes the function
    model.save_pretrained(tmp_path / "peft", safe_serialization=safe)
    return model.eval(), tmp_path / "peft"


def cli(*args: str) -> Any:
    return CliRunner().invoke(main, [str(a) for a in args])


def import_args(tmp_path: Path, adapter: Path, family: str = "vit") -> list[str]:
    """import-peft with a config for the tiny backbone (its size arguments) and the base weights file."""
    name, kwargs = BACKBONES[family]
    config = {"backbone": name, "backbone_kwargs": kwargs, "data": "digits:0-4"}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    args = [adapter, "--config", tmp_path / "run.yaml", "--checkpoint", tmp_path / "base.safetensors"]
    return [str(a) for a in ("import-peft", *args, "--out", tmp_path / "run")]


def timm_model(family: str, weights: Path) -> torch.nn.Module:
    """The tiny ViT or Swin with the weights of a file, in plain timm (no vitfold code)."""
    model = make_vit(BACKBONES[family][0], num_classes=CLASSES, **BACKBONES[family][1])
    model.load_state_dict(load_file(weights))
    return model


def max_rel(value: torch.Tensor, reference: torch.Tensor) -> float:
    """max |y − r| / max |r|, in float64."""
    value, reference = value.double(), reference.double()
    return float((value - reference).abs().max() / reference.abs().max())


MATRIX = (
    [("vit", case, True) for case in CASES]
    + [("vit", "short-names-head-patterns", False)]
    + [("swin", case, True) for case in SWIN_CASES]
)


@pytest.mark.parametrize(("family", "case", "safe"), MATRIX)
def test_import_peft_folds_to_peft_forward_and_merge_and_unload(tmp_path, family, case, safe):
    peft_model, adapter = saved_peft(tmp_path, safe, family, **(CASES | SWIN_CASES)[case])
    assert (adapter / ("adapter_model.safetensors" if safe else "adapter_model.bin")).is_file()
    result = cli(*import_args(tmp_path, adapter, family))
    assert result.exit_code == 0, result.output
    assert cli("fold", tmp_path / "run").exit_code == 0
    model = timm_model(family, tmp_path / "run" / "fold" / "model.safetensors")
    base = timm_model(family, tmp_path / "base.safetensors")
    merged = copy.deepcopy(peft_model).merge_and_unload().eval()
    for batch in (1, 3):
        x = images(model, batch)
        with torch.no_grad():
            ours, theirs, their_merge, before = model(x), peft_model(x), merged(x), base(x)
        assert max_rel(theirs, before) > 1e-2  # the adapter (or the head) is far from the identity
        assert max_rel(ours, theirs) <= 1e-5
        assert max_rel(ours, their_merge) <= 1e-5


@pytest.mark.parametrize("case", ["short-names-head-patterns", "short-names-with-patch-embedding"])
def test_imported_run_exports_and_verifies(tmp_path, case):
    """The acceptance path: import-peft, fold, export, then `vitfold verify` as a user runs it exits 0; the run
    reads as trained (not stale). LoRA on the patch embedding makes the imported base the run's checkpoint."""
    _, adapter = saved_peft(tmp_path, **CASES[case])
    assert cli(*import_args(tmp_path, adapter)).exit_code == 0
    run = tmp_path / "run"
    rd = RunDir(run)
    assert rd.config.method == "lora" and rd.config.num_classes == CLASSES
    assert (rd.config.checkpoint == str(rd.imported_backbone.resolve())) == ("patch" in case)
    assert staleness(rd, "train", TRAIN.inputs(rd, rd.config), TRAIN.params(rd.config)) is None
    imported_from = json.loads(rd.manifest_file.read_text())["stages"]["train"]["imported_from"]
    assert imported_from["path"] == str(adapter.resolve()) and imported_from["method"] == "peft-lora"
    for args in (["fold", run], ["export", run, "--format", "torchscript"]):
        result = cli(*args)
        assert result.exit_code == 0, result.output
    result = vitfold_cli("verify", str(run), "--batch-sizes", "2", "--samples", "2", "--eval-images", "8")
    assert result.returncode == 0, result.stderr
    assert json.loads((run / "verify" / "verify.json").read_text())["passed"] is True


def test_unreadable_adapter_folders_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    result = cli("import-peft", tmp_path / "empty", "--backbone", NAME, "--out", tmp_path / "run")
    assert result.exit_code == 2 and "adapter_config.json" in result.output
    _, adapter = saved_peft(tmp_path, target_modules=["qkv"], r=2, lora_alpha=4)
    (adapter / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    result = cli(*import_args(tmp_path, adapter))
    assert result.exit_code == 2 and "adapter_model.safetensors" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


REFUSED = {  # LoraConfig arguments, then edits of the saved adapter_config.json -> what the one-line error names
    "dora": ({"use_dora": True}, {}, "'use_dora'"),
    "pissa-rewrote-the-base": ({"init_lora_weights": "pissa"}, {}, "'init_lora_weights'"),
    "layer-replication": ({}, {"layer_replication": [[0, 2], [1, 2]]}, "'layer_replication'"),
    "another-peft-method": ({}, {"peft_type": "IA3"}, "'peft_type'"),
    "an-unknown-bias-setting": ({}, {"bias": "some"}, "'bias'"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_what_cannot_fold_exactly_is_one_line_exit_2_and_no_run(tmp_path, case):
    lora, edits, named = REFUSED[case]
    _, adapter = saved_peft(tmp_path, target_modules=["qkv"], r=2, lora_alpha=4, **lora)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(config | edits))
    result = cli(*import_args(tmp_path, adapter))
    assert result.exit_code == 2, result.output
    message = result.output.strip()
    assert "\n" not in message and "Traceback" not in message
    assert named in message
    assert not (tmp_path / "run").exists()  # nothing written, not even the directory


def test_lora_on_a_layer_the_backbone_lacks_is_refused_by_name(tmp_path):
    """A target module vitfold does not know: the adapter names blocks.7 of a two-block backbone."""
    _, adapter = saved_peft(tmp_path, target_modules=["blocks.1.attn.qkv"], r=2, lora_alpha=4)
    tensors = load_file(adapter / "adapter_model.safetensors")
    save_file(
        {k.replace("blocks.1.", "blocks.7."): v for k, v in tensors.items()}, adapter / "adapter_model.safetensors"
    )
    result = cli(*import_args(tmp_path, adapter))
    assert result.exit_code == 2 and "'blocks.7.attn.qkv'" in result.output and "not in the backbone" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_base_weights_and_backbone_are_asked_for(tmp_path):
    _, adapter = saved_peft(tmp_path, target_modules=["qkv"], r=2, lora_alpha=4)
    without_weights = [a for a in import_args(tmp_path, adapter) if a != str(tmp_path / "base.safetensors")]
    without_weights.remove("--checkpoint")
    result = cli(*without_weights)
    assert result.exit_code == 2 and "--pretrained" in result.output and "--checkpoint" in result.output
    result = cli("import-peft", adapter, "--checkpoint", tmp_path / "base.safetensors", "--out", tmp_path / "run")
    assert result.exit_code == 2 and "base_model_name_or_path" in result.output and "--backbone" in result.output
    assert not (tmp_path / "run").exists()


def test_default_backbone_is_the_timm_hub_name():
    hub = "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k"
    assert default_backbone({"base_model_name_or_path": hub}) == "vit_base_patch16_224.augreg2_in21k_ft_in1k"
    assert default_backbone({"base_model_name_or_path": "hf-hub:timm/vit_small_patch16_224"}) == "vit_small_patch16_224"
    for other in (None, "google/vit-base-patch16-224", "/home/me/model", "timm/"):
        assert default_backbone({"base_model_name_or_path": other}) is None
