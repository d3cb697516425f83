"""Hugging Face PEFT LoRA adapters on timm models, in the terms of vitfold's `lora` method.

peft_dir = read_peft("my-lora/")                       # adapter_config.json + adapter_model.safetensors (or .bin)
imported = peft_to_lora(peft_dir, lora_places(model))  # model: the timm backbone PEFT wrapped
load_adapter(adapt(model, "lora", num_classes=..., **imported.options), imported.adapter | head)

PEFT's LoRA on an nn.Linear (`peft/tuners/lora/layer.py`), W [out, in]:

    y = x Wᵀ + b + s · (x Aᵀ) Bᵀ = x (W + s B A)ᵀ + b,   A = lora_A.weight [r, in], B = lora_B.weight [out, r]
    s = α / r  (use_rslora: α / √r),  r and α per module: `rank_pattern` / `alpha_pattern` (the first key K with
    re.match("(.*\\.)?(K)$", module name), as PEFT's get_pattern_key), else `r` / `lora_alpha`

which is vitfold's LoRALinear, W' = W + s* B A with one rank R and one scale s* for every layer. The map is exact:
R = the largest r, A padded with zero rows and B with zero columns (they add exact zeros); s* = the common s when
every module has the same (B then copied bit for bit), else 1 with B' = s B; a layer PEFT left alone gets A = B = 0.
`fan_in_fan_out` does not apply to nn.Linear (PEFT itself resets it), dropout only acts in training, and the
selection keys (`target_modules`, `layers_to_transform`, ...) only choose where LoRA goes: the saved tensors say
where it went. Any other setting that changes the function (DoRA, a LoRA bias, trained base biases, ...) is refused,
naming its key.

PEFT name (prefix `base_model.model.`)                        vitfold name
    {layer}.lora_A.weight, {layer}.lora_B.weight              {layer}.A, {layer}.B   (layer: a `lora` place,
                                                                                      e.g. blocks.3.attn.qkv)
    head.* (modules_to_save=["head"])                         head.*
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitfold.errors import CheckpointError
from vitfold.pipeline.adapters.targets import BLOCK_LINEARS, find_targets
from vitfold.pipeline.backbones import read_state_dict

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")  # PEFT's default, then its safe_serialization=False
PREFIX = "base_model.model."  # what PeftModel puts before the wrapped model's own names
HEAD = "head"  # the timm classifier (ViT: head.weight/bias; Swin: head.fc.weight/bias)
LORA_KEY = re.compile(r"(?P<layer>.+)\.lora_(?P<part>[AB])\.weight")

# adapter_config.json keys read here; keys that only choose where LoRA goes or how it was initialised or trained
# (the saved tensors hold the outcome); every other key must be unset (None, false, empty), else it is refused.
READ_KEYS = frozenset(
    ("peft_type", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "modules_to_save", "bias")
)
IGNORED_KEYS = frozenset(
    (
        "base_model_name_or_path",  # the backbone: --backbone's default (default_backbone)
        "fan_in_fan_out",  # PEFT resets it for nn.Linear: A and B have the same layout either way
        "target_modules",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
        "lora_dropout",
        "init_lora_weights",
        "loftq_config",
        "eva_config",
        "corda_config",
        "lora_ga_config",
        "inference_mode",
        "task_type",
        "revision",
        "peft_version",
        "auto_mapping",
        "megatron_core",  # a module path, used only with megatron_config (refused when set)
        "qalora_group_size",  # used only with use_qalora (refused when set)
        "ensure_weight_tying",  # ties embeddings; a timm vision model has none
        "runtime_config",  # ephemeral GPU offload: where, not what
    )
)


@dataclass(frozen=True)
class PeftAdapter:
    """A PEFT adapter folder: its config and its tensors (PEFT's names)."""

    path: Path
    weights: Path
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]


@dataclass(frozen=True)
class PeftImport:
    """A PEFT LoRA adapter as vitfold `lora`: the tensors under vitfold's names (the head's when PEFT saved it),
    the method options (rank, alpha), the head size (None: the backbone's own head) and the layers adapted."""

    adapter: dict[str, torch.Tensor]
    options: dict[str, Any]
    num_classes: int | None
    layers: tuple[str, ...]


def read_peft(path: str | Path) -> PeftAdapter:
    """The PEFT adapter folder `path` (adapter_config.json and adapter_model.safetensors, else .bin, read with
    weights_only); a `CheckpointError` naming the file at fault."""
    path = Path(path)
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise CheckpointError(f"{path}: no {CONFIG_FILE} (a PEFT adapter folder, as save_pretrained writes it)")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{config_file}: not readable JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file}: not a PEFT config (a JSON object)")
    weights = next((path / name for name in WEIGHT_FILES if (path / name).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{path}: neither {' nor '.join(WEIGHT_FILES)}")
    try:
        tensors = read_state_dict(weights)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged safetensors file: its name and the first line of the reason
        raise CheckpointError(f"cannot read {weights}: {str(e).strip().splitlines()[0]}") from None
    if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise CheckpointError(f"{weights} holds no PEFT adapter tensors")
    return PeftAdapter(path, weights, config, tensors)


def default_backbone(config: dict[str, Any]) -> str | None:
    """The timm name in PEFT's `base_model_name_or_path` ("timm/vit_base_patch16_224.augreg2_in21k_ft_in1k" ->
    "vit_base_patch16_224.augreg2_in21k_ft_in1k"); None when it names no timm hub model."""
    name = config.get("base_model_name_or_path")
    if isinstance(name, str) and name.startswith("hf-hub:"):
        name = name.removeprefix("hf-hub:")
    if isinstance(name, str) and name.startswith("timm/") and name.count("/") == 1 and len(name) > len("timm/"):
        return name.removeprefix("timm/")
    return None


def lora_places(model: nn.Module) -> dict[str, tuple[int, int]]:
    """The linears vitfold's `lora` adapts in `model` (a timm ViT or Swin) -> their (out, in) features."""
    return {
        t.name: (model.get_submodule(t.name).out_features, model.get_submodule(t.name).in_features)
        for t in find_targets(model, shifts=False).linears
    }


def _setting(adapter: PeftAdapter, key: str, value: Any, why: str) -> CheckpointError:
    return CheckpointError(f"{adapter.path / CONFIG_FILE}: '{key}' = {json.dumps(value)}: {why}")


def _check_config(adapter: PeftAdapter) -> None:
    """PEFT LoRA with nothing set that vitfold's W' = W + s B A does not compute."""
    config = adapter.config
    if config.get("peft_type") != "LORA":
        raise _setting(adapter, "peft_type", config.get("peft_type"), "vitfold imports PEFT LoRA adapters only")
    if config.get("bias", "none") != "none":
        why = "PEFT trained biases beside LoRA; vitfold's lora keeps the base biases (train with bias='none')"
        raise _setting(adapter, "bias", config["bias"], why)
    for key in sorted(set(config) - READ_KEYS - IGNORED_KEYS):
        if config[key] not in (None, False, {}, [], ""):
            why = "vitfold folds plain LoRA only (W' = W + s·B·A), and this setting computes something else"
            raise _setting(adapter, key, config[key], why)
    saved = config.get("modules_to_save") or []
    for name in saved:
        if name != HEAD:
            raise _setting(adapter, "modules_to_save", saved, f"'{name}': vitfold imports the classifier 'head' only")


def _number(adapter: PeftAdapter, key: str, value: Any, integer: bool) -> float:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) or value <= 0:
        raise _setting(adapter, key, value, f"must be a positive {'integer' if integer else 'number'}")
    return value


def _per_module(adapter: PeftAdapter, pattern_key: str, default_key: str, layer: str, integer: bool) -> float:
    """`r` or `lora_alpha` of `layer`: its `rank_pattern` / `alpha_pattern` entry, else the default."""
    patterns = adapter.config.get(pattern_key) or {}
    if not isinstance(patterns, dict):
        raise _setting(adapter, pattern_key, patterns, "must map module name patterns to values")
    for key, value in patterns.items():
        try:
            matched = re.match(rf"(.*\.)?({key})$", layer)
        except re.error as e:
            raise _setting(adapter, pattern_key, key, f"not a regular expression ({e})") from None
        if matched:
            return _number(adapter, f"{pattern_key}.{key}", value, integer)
    return _number(adapter, default_key, adapter.config.get(default_key), integer)


def _split(adapter: PeftAdapter) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """PEFT's tensors -> ({layer: {"A": lora_A, "B": lora_B}}, head tensors under vitfold's names); a tensor of
    anything else is refused, named."""
    saved_head = HEAD in (adapter.config.get("modules_to_save") or [])
    lora: dict[str, dict[str, torch.Tensor]] = {}
    head: dict[str, torch.Tensor] = {}
    for key, tensor in adapter.tensors.items():
        if not key.startswith(PREFIX):
            raise CheckpointError(f"{adapter.weights}: '{key}' is not a PeftModel name ({PREFIX}...)")
        name = key.removeprefix(PREFIX)
        if match := LORA_KEY.fullmatch(name):
            lora.setdefault(match["layer"], {})[match["part"]] = tensor
        elif saved_head and name.startswith(HEAD + "."):
            head[name] = tensor
        else:
            raise CheckpointError(
                f"{adapter.weights}: '{name}' is neither LoRA's A/B nor the saved head: vitfold cannot fold it"
            )
    for layer, parts in lora.items():
        if set(parts) != {"A", "B"}:
            raise CheckpointError(f"{adapter.weights}: layer '{layer}' has lora_{''.join(parts)} without its pair")
    if saved_head and not head:
        raise CheckpointError(f"{adapter.weights}: modules_to_save names 'head' but no head tensor was saved")
    return lora, head


def peft_to_lora(adapter: PeftAdapter, places: dict[str, tuple[int, int]]) -> PeftImport:
    """The PEFT LoRA `adapter` as vitfold `lora` tensors and options for a model whose `lora` places are `places`
    (`lora_places`). Refuses, naming the key, what the map in the module docstring does not cover."""
    _check_config(adapter)
    lora, head = _split(adapter)
    if not lora:
        raise CheckpointError(f"{adapter.weights} holds no lora_A/lora_B tensors")
    scales: dict[str, float] = {}
    for layer, parts in sorted(lora.items()):
        if layer not in places:
            raise CheckpointError(
                f"{adapter.weights}: LoRA on '{layer}', which vitfold's lora does not adapt (it adapts "
                f"{', '.join(BLOCK_LINEARS)} of every block of the backbone)"
            )
        r = int(_per_module(adapter, "rank_pattern", "r", layer, integer=True))
        alpha = _per_module(adapter, "alpha_pattern", "lora_alpha", layer, integer=False)
        out_features, in_features = places[layer]
        a, b = parts["A"], parts["B"]
        if tuple(a.shape) != (r, in_features) or tuple(b.shape) != (out_features, r):
            raise CheckpointError(
                f"{adapter.weights}: '{layer}' has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; with "
                f"r = {r} (adapter_config.json) the backbone needs {(r, in_features)} and {(out_features, r)}"
            )
        scales[layer] = alpha / math.sqrt(r) if adapter.config.get("use_rslora") else alpha / r
    rank = max(parts["A"].shape[0] for parts in lora.values())
    common = set(scales.values())
    scale = common.pop() if len(common) == 1 else 1.0  # s*: B keeps PEFT's values bit for bit when s is shared
    tensors: dict[str, torch.Tensor] = {}
    for layer, (out_features, in_features) in places.items():
        a_full = torch.zeros(rank, in_features, dtype=torch.float32)
        b_full = torch.zeros(out_features, rank, dtype=torch.float32)
        if layer in lora:
            a, b = lora[layer]["A"], lora[layer]["B"]
            factor = scales[layer] / scale
            a_full[: a.shape[0]] = a  # [r, in] into [R, in]: the extra rows stay 0
            b_full[:, : b.shape[1]] = b if factor == 1.0 else b.double() * factor  # [out, r] into [out, R]
        tensors |= {f"{layer}.A": a_full, f"{layer}.B": b_full}
    head_weights = [t for name, t in head.items() if name.endswith(".weight")]  # [classes, features]
    num_classes = int(head_weights[0].shape[0]) if head_weights else None
    options = {"rank": rank, "alpha": scale * rank}
    return PeftImport(tensors | head, options, num_classes, tuple(sorted(lora)))
