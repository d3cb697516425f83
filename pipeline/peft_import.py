"""Hugging Face PEFT LoRA adapters on timm models, in the terms of vitfold's `lora` method.

peft_dir = read_peft("my-lora/")  # adapter_config.json + adapter_model.safetensors (or .bin)
imported = peft_to_lora(peft_dir, model, base_head)  # model: the timm model PEFT wrapped, base_head: its head's
model.load_state_dict(imported.backbone, strict=False)  # when LoRA was merged into the base (patch_embed.proj)
load_adapter(adapt(model, "lora", num_classes=imported.num_classes, **imported.options), imported.adapter)

PEFT's LoRA on an nn.Linear (`peft/tuners/lora/layer.py`), W [out, in]:

    y = x Wᵀ + b + s · (x Aᵀ) Bᵀ = x (W + s B A)ᵀ + b,   A = lora_A.weight [r, in], B = lora_B.weight [out, r]
    s = α / r  (use_rslora: α / √r),  r and α per module: `rank_pattern` / `alpha_pattern` (the first key K with
    re.match("(.*\\.)?(K)$", module name), as PEFT's get_pattern_key), else `r` / `lora_alpha`

which is vitfold's LoRALinear, W' = W + s* B A with one rank R and one scale s* for every layer. The map is exact:
R = the largest r, A padded with zero rows and B with zero columns (they add exact zeros); s* = the common s when
every module has the same (B then copied bit for bit), else 1 with B' = s B; a layer PEFT left alone gets A = B = 0.
`fan_in_fan_out` does not apply to nn.Linear (PEFT itself resets it), dropout only acts in training, and the
selection keys (`target_modules`, `layers_to_transform`, ...) only choose where LoRA goes: the saved tensors say
where it went. LoRA on a layer vitfold's lora does not adapt is merged at import into the weight it adds to, in
float64 as the fold does: the head's (new in a vitfold run, saved with the adapter; target_modules="all-linear"
takes the head of a timm model) or the base's (an nn.Linear, or an nn.Conv2d as timm's patch_embed.proj, which
"proj" takes; the run's base weights are then RUN/import/backbone.safetensors). A LoRA bias (`lora_bias`: lora_B
has one, scaled with it) adds to the layer's bias, b + s b_B; tensors PEFT trained in place (`bias="all"` or
"lora_only", `modules_to_save`) replace the base's. DoRA (`use_dora`) and any other setting that changes the
function is refused, naming its key.

PEFT name (prefix `base_model.model.`)                        vitfold name
    {layer}.lora_A.weight, {layer}.lora_B.weight              {layer}.A, {layer}.B   (layer: a `lora` place,
                                                                                      e.g. blocks.3.attn.qkv)
    head.* (modules_to_save=["head"])                         head.*  (else the base model's head)
    head.lora_{A,B}.weight                                    merged: head.weight + s B A
    {other}.lora_{A,B}.weight (patch_embed.proj, ...)         merged: {other}.weight + s B A (the imported base)
    {layer}.lora_B.bias                                       merged: {layer}.bias + s b_B
    {layer}.base_layer.bias, {module}.* (bias, modules_to_save)   replace {layer}.bias, {module}.*
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
from vitfold.pipeline.adapters.targets import find_targets
from vitfold.pipeline.backbones import read_state_dict

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")  # PEFT's default, then its safe_serialization=False
PREFIX = "base_model.model."  # what PeftModel puts before the wrapped model's own names
HEAD = "head"  # the timm classifier (ViT: head.weight/bias; Swin: head.fc.weight/bias)
LORA_KEY = re.compile(r"(?P<layer>.+)\.lora_(?P<part>A\.weight|B\.weight|B\.bias)")
LORA_PARTS = {"A.weight": "A", "B.weight": "B", "B.bias": "bias"}
BIAS_SETTINGS = ("none", "all", "lora_only")  # PEFT's `bias`: which base biases trained (and were saved)
# initialisations of A and B alone; the others (pissa, olora, corda, loftq, lora_ga) rewrite the base weights too
BASE_KEEPING_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")

# adapter_config.json keys read here; keys that only choose where LoRA goes or how it was initialised or trained
# (the saved tensors hold the outcome); every other key must be unset (None, false, empty), else it is refused.
READ_KEYS = frozenset(
    ("peft_type", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "modules_to_save", "bias")
    + ("lora_bias", "init_lora_weights")
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
    """A PEFT LoRA adapter as vitfold `lora`: the tensors under vitfold's names (the head's too), the base
    weights with LoRA merged into layers vitfold's lora does not adapt ({} when there are none), the method
    options (rank, alpha), the head size and the layers PEFT adapted."""

    adapter: dict[str, torch.Tensor]
    backbone: dict[str, torch.Tensor]
    options: dict[str, Any]
    num_classes: int
    layers: tuple[str, ...]


def read_peft_config(path: str | Path) -> dict[str, Any]:
    """adapter_config.json of the PEFT adapter folder `path`; a `CheckpointError` naming the file at fault."""
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
    return config


def read_peft(path: str | Path) -> PeftAdapter:
    """The PEFT adapter folder `path` (adapter_config.json and adapter_model.safetensors, else .bin, read with
    weights_only); a `CheckpointError` naming the file at fault."""
    path = Path(path)
    config = read_peft_config(path)
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
    """PEFT LoRA with nothing set that W' = W + s B A (b' = b + s b_B, trained tensors replacing the base's)
    does not compute."""
    config = adapter.config
    if config.get("peft_type") != "LORA":
        raise _setting(adapter, "peft_type", config.get("peft_type"), "vitfold imports PEFT LoRA adapters only")
    init = config.get("init_lora_weights", True)
    if (init.lower() if isinstance(init, str) else init) not in BASE_KEEPING_INITS:
        why = (
            "this initialisation rewrote the base weights the adapter was trained on: save it converted to plain "
            "LoRA (save_pretrained(..., path_initial_model_for_weight_conversion=...))"
        )
        raise _setting(adapter, "init_lora_weights", init, why)
    if config.get("bias", "none") not in BIAS_SETTINGS:
        raise _setting(adapter, "bias", config["bias"], f"PEFT's values are {', '.join(BIAS_SETTINGS)}")
    for key in sorted(set(config) - READ_KEYS - IGNORED_KEYS):
        if config[key] not in (None, False, {}, [], ""):
            why = "vitfold folds plain LoRA only (W' = W + s·B·A), and this setting computes something else"
            raise _setting(adapter, key, config[key], why)


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


def saves_head(config: dict[str, Any]) -> bool:
    """Whether PEFT saved a trained classifier beside LoRA (modules_to_save = ["head"] or ["head.fc"])."""
    return any(name == HEAD or name.startswith(HEAD + ".") for name in config.get("modules_to_save") or [])


def _split(adapter: PeftAdapter) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """PEFT's tensors -> ({layer: {"A": lora_A, "B": lora_B[, "bias": lora_B's bias]}}, the other tensors it saved
    (modules_to_save, bias="all"/"lora_only") under timm's names)."""
    lora: dict[str, dict[str, torch.Tensor]] = {}
    saved: dict[str, torch.Tensor] = {}
    for key, tensor in adapter.tensors.items():
        if not key.startswith(PREFIX):
            raise CheckpointError(f"{adapter.weights}: '{key}' is not a PeftModel name ({PREFIX}...)")
        name = key.removeprefix(PREFIX)
        if match := LORA_KEY.fullmatch(name):
            lora.setdefault(match["layer"], {})[LORA_PARTS[match["part"]]] = tensor
        else:  # a wrapped layer's own tensors sit under base_layer
            saved[name.replace(".base_layer.", ".")] = tensor
    for layer, parts in lora.items():
        if not {"A", "B"} <= set(parts):
            raise CheckpointError(f"{adapter.weights}: layer '{layer}' lacks lora_A or lora_B")
    if not lora:
        raise CheckpointError(f"{adapter.weights} holds no lora_A/lora_B tensors")
    return lora, saved


def _scale(adapter: PeftAdapter, layer: str, a: torch.Tensor, b: torch.Tensor, weight: torch.Size) -> float:
    """s of `layer` (α / r, rsLoRA α / √r), its lora_A and lora_B checked against its r and the shape of the
    `weight` they add to: Linear [out, in]: A [r, in], B [out, r]; Conv2d [out, in, kh, kw]: A [r, in, kh, kw],
    B [out, r, 1, 1]."""
    r = int(_per_module(adapter, "rank_pattern", "r", layer, integer=True))
    alpha = _per_module(adapter, "alpha_pattern", "lora_alpha", layer, integer=False)
    need_a, need_b = (r, *weight[1:]), (weight[0], r, *(1,) * (len(weight) - 2))
    if tuple(a.shape) != need_a or tuple(b.shape) != need_b:
        raise CheckpointError(
            f"{adapter.weights}: '{layer}' has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; with "
            f"r = {r} (adapter_config.json) the backbone needs {need_a} and {need_b}"
        )
    return alpha / math.sqrt(r) if adapter.config.get("use_rslora") else alpha / r


def merged(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """W + s B A in float64, cast back to W's dtype; a Conv2d's A [r, in, kh, kw] and 1x1 B [out, r, 1, 1] as
    matrices (a 1x1 convolution after a k x k one is one k x k convolution)."""
    delta = b.double().flatten(1) @ a.double().flatten(1)  # [out, r] @ [r, in·kh·kw] -> [out, in·kh·kw]
    return (weight.double() + scale * delta.reshape(weight.shape)).to(weight.dtype)


def _check_mergeable(adapter: PeftAdapter, base: nn.Module, layer: str) -> None:
    """`layer`, a module of `base` that vitfold's `lora` does not adapt, takes its LoRA merged into its weight:
    an nn.Linear or an ungrouped nn.Conv2d (timm's patch embedding); anything else is refused, named."""
    try:
        module = base.get_submodule(layer)
    except AttributeError:
        module = None
    if not isinstance(module, nn.Linear | nn.Conv2d) or getattr(module, "groups", 1) != 1:
        kind = "not in the backbone" if module is None else f"a {type(module).__name__}"
        raise CheckpointError(
            f"{adapter.weights}: LoRA on '{layer}' ({kind}): vitfold folds LoRA on nn.Linear and nn.Conv2d layers"
        )


def _replace(adapter: PeftAdapter, tensors: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    """`value` in place of the base tensor `name` of `tensors`, which must have it, with its shape."""
    if name not in tensors or tensors[name].shape != value.shape:
        raise CheckpointError(
            f"{adapter.weights}: '{name}' {tuple(value.shape)} (modules_to_save / bias) is no tensor of the backbone"
            + (f" (it has {tuple(tensors[name].shape)})" if name in tensors else "")
        )
    tensors[name] = value


def peft_to_lora(adapter: PeftAdapter, base: nn.Module, base_head: dict[str, torch.Tensor]) -> PeftImport:
    """The PEFT LoRA `adapter` as vitfold `lora` tensors and options for `base`, the timm model PEFT wrapped.

    The head is `base_head` (the base model's classifier, timm names; {} when PEFT saved its own) with what PEFT
    saved of it. LoRA on a vitfold `lora` place stays an adapter; LoRA on the head (the run's to write) or on
    another layer (target_modules "proj" also takes timm's patch_embed.proj) is merged into its weight, W + s B A,
    and a LoRA bias into its bias, b + s b_B; tensors PEFT trained in place (modules_to_save, bias="all") replace
    the base's. What changes the base lands in `PeftImport.backbone`. Anything else is refused, named."""
    _check_config(adapter)
    lora, saved = _split(adapter)
    places = lora_places(base)
    head = dict(base_head)
    state = {name: t for name, t in base.state_dict().items() if not name.startswith(HEAD + ".")}
    for name, tensor in saved.items():
        if name.startswith(HEAD + "."):
            head[name] = tensor  # PEFT's saved head, or a trained head bias on the base's head
        else:
            _replace(adapter, state, name, tensor)
    head_weights = [name for name in head if name.endswith(".weight")]  # [classes, features]
    if not head_weights:
        raise CheckpointError(
            f"{adapter.path}: the base weights have no classifier and the adapter saved none (modules_to_save)"
        )
    base_changed = any(not name.startswith(HEAD + ".") for name in saved)
    scales: dict[str, float] = {}
    for layer, parts in sorted(lora.items()):
        weight, bias = f"{layer}.weight", f"{layer}.bias"
        if layer in places:
            shape = torch.Size(places[layer])
        elif weight in head:
            shape = head[weight].shape
        else:
            _check_mergeable(adapter, base, layer)
            shape = state[weight].shape
        scales[layer] = _scale(adapter, layer, parts["A"], parts["B"], shape)
        if layer not in places:  # merged: the head's or the base's weight
            into = head if weight in head else state
            into[weight] = merged(into[weight], parts["A"], parts["B"], scales[layer])
            base_changed |= into is state
        if "bias" in parts:  # lora_bias: lora_B has a bias, scaled with it: b' = b + s b_B
            into = head if bias in head else state
            if bias not in into or into[bias].shape != parts["bias"].shape:
                raise CheckpointError(f"{adapter.weights}: '{layer}' has a LoRA bias that fits no bias of the layer")
            into[bias] = (into[bias].double() + scales[layer] * parts["bias"].double()).to(into[bias].dtype)
            base_changed |= into is state
    adapted = sorted(set(lora) & set(places))
    rank = max((lora[layer]["A"].shape[0] for layer in adapted), default=1)
    common = {scales[layer] for layer in adapted}
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
    num_classes = int(head[head_weights[0]].shape[0])
    options = {"rank": rank, "alpha": scale * rank}
    return PeftImport(tensors | head, state if base_changed else {}, options, num_classes, tuple(sorted(lora)))
