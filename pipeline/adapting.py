"""Library API: attach an adapter to a timm ViT, and move only its tensors in and out.

model = pipeline.adapt(timm.create_model(name), method="rlrr", num_classes=10, init="paper")
state = pipeline.adapter_state_dict(model)   # adapter + new head tensors, names as in state_dict()
pipeline.load_adapter(other_adapted_model, state)
pipeline.save_adapter(model, "rlrr.safetensors")            # PEFT-style: tensors + method, options, backbone
pipeline.load_adapter(timm.create_model(name), "rlrr.safetensors")   # attaches the file's adapter, then loads
"""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitfold.errors import AdapterError
from vitfold.pipeline.adapter_files import adapter_file_metadata, file_method, read_adapter_file, write_adapter_file
from vitfold.pipeline.adapters import METHODS, AdapterLayer, AdapterModule, AdapterRecord, get_method
from vitfold.pipeline.adapters.targets import model_family

RECORD_ATTR = "vitfold_adapter"


def adapter_record(model: nn.Module) -> AdapterRecord:
    """The record `adapt` left on the model; an `AdapterError` if it was never adapted."""
    record = getattr(model, RECORD_ATTR, None)
    if record is None:
        raise AdapterError("model has no vitfold adapter: call pipeline.adapt(model, method=...) first")
    return record


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """(name, layer) of every adapter layer in the model, in module order."""
    return ((name, m) for name, m in model.named_modules() if isinstance(m, AdapterLayer))


def adapter_modules(model: nn.Module) -> Iterator[tuple[str, AdapterModule]]:
    """(name, module) of every adapter module (layers and shared factors), in module order."""
    return ((name, m) for name, m in model.named_modules() if isinstance(m, AdapterModule))


def _head_named_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    classifier = model.get_classifier()
    heads = classifier if isinstance(classifier, tuple) else (classifier,)  # distilled DeiT: (head, head_dist)
    ids = {id(p) for head in heads for p in head.parameters()}
    return ((name, p) for name, p in model.named_parameters() if id(p) in ids)


def _adapter_named_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    for name, module in adapter_modules(model):
        for pname, p in module.adapter_named_parameters():
            yield f"{name}.{pname}", p


def trainable_named_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Adapter tensors (and, for full fine-tuning, the base), then the new head's if `adapt` made one:
    exactly what the adapter file holds. Each tensor once."""
    record = adapter_record(model)
    seen: set[int] = set()
    head = _head_named_parameters(model) if record.new_head else iter(())
    for name, p in itertools.chain(
        _adapter_named_parameters(model), get_method(record.method).trainable_base(model), head
    ):
        if id(p) not in seen:
            seen.add(id(p))
            yield name, p


def _new_head(model: nn.Module, num_classes: int, init: str) -> None:
    """timm's `reset_classifier` (a randomly initialised nn.Linear), then `init` (HEAD_INITS): zero, or a
    trunc-normal(0.02) weight with a zero bias, or kept; on the model's device, in its dtype."""
    from timm.layers import trunc_normal_

    ref = next(model.parameters())
    model.reset_classifier(num_classes)
    for _, p in _head_named_parameters(model):
        p.data = p.to(ref.device, ref.dtype)
        if init == "zero" or (init == "trunc-normal" and p.dim() == 1):
            p.data.zero_()
        elif init == "trunc-normal":
            trunc_normal_(p.data, std=0.02)


def _method_and_options(method: str | Any, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(method name, options) from a name plus keyword options, or from a typed config
    (`vitfold.RLRRConfig(...)`, one method's options dataclass, already validated when it was built)."""
    if isinstance(method, str):
        return method, options
    found = [cls.name for cls in METHODS.values() if type(method) is cls.options_type]
    if not found:
        known = ", ".join(cls.options_type.__name__ for cls in METHODS.values())
        raise AdapterError(
            f"must be a method name or a method config ({known}), got {type(method).__name__}", argument="method"
        )
    if options:
        raise AdapterError(f"give the options in the config or as keywords, not both (got {', '.join(options)})")
    return found[0], asdict(method)


def adapt(model: nn.Module, method: str | Any = "rlrr", *, num_classes: int | None = None, **options: Any) -> nn.Module:
    """Attach adapter `method` to a timm ViT in place and return it.

    `method` is a name ("rlrr", "efft2", ...) with the method's `options` as keywords (e.g.
    `init="paper" | "identity"` for RLRR), or a typed config (`vitfold.RLRRConfig(init="paper")`,
    `vitfold.EFFT2Config(rank=8)`, ...); an unknown or invalid option is an `AdapterError`.
    All base parameters are frozen; the adapter tensors train, and so does a new head when `num_classes`
    is given: zero-initialised, or with timm's random init for a method whose official code keeps it
    (EFFT). Otherwise the model's own head is kept, frozen.
    """
    method, options = _method_and_options(method, options)
    if getattr(model, RECORD_ATTR, None) is not None:
        raise AdapterError(f"model already has a '{getattr(model, RECORD_ATTR).method}' adapter")
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise AdapterError(f"must be a positive integer, got {num_classes!r}", argument="num_classes")
    adapter = get_method(method)(**options)  # validates options before the model is touched
    model.requires_grad_(False)
    adapter.attach(model)
    if num_classes is not None:
        _new_head(model, num_classes, adapter.head_init(model_family(model)))
    model.train(model.training)  # new modules take the model's train/eval mode
    setattr(model, RECORD_ATTR, AdapterRecord(method, asdict(adapter.options), new_head=num_classes is not None))
    for _, p in trainable_named_parameters(model):
        p.requires_grad_(True)
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter (and new head) tensors only, detached copies, keyed as in `model.state_dict()`."""
    return {name: p.detach().clone() for name, p in trainable_named_parameters(model)}


def timm_architecture(model: nn.Module) -> str:
    """The timm architecture the model was created as (without a pretrained tag: which weights it holds
    cannot be read off the model), or its class name."""
    return (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__


def save_adapter(
    model: nn.Module,
    path: str | Path,
    *,
    backbone: str | None = None,
    backbone_kwargs: dict[str, Any] | None = None,
    base: str | None = None,
    **extra: Any,
) -> Path:
    """Write the adapter (and new head) tensors of an adapted model to a safetensors file, atomically, with
    the method, its options, the head size and the vitfold version in its metadata, and what is known of
    the backbone, nothing guessed: `backbone` (default: the model's timm architecture, untagged),
    `backbone_kwargs` (default: the size arguments in which the model differs from that architecture's
    defaults), `base` (the base weights' identity, e.g. a checkpoint's sha256; default "unknown").
    `extra` adds more. `load_adapter(model, path)` reads it back."""
    from vitfold.pipeline.backbones import backbone_size_kwargs

    record = adapter_record(model)
    metadata = adapter_file_metadata(
        record.method,
        record.options,
        backbone or timm_architecture(model),
        int(getattr(model, "num_classes", 0)),
        record.new_head,
        backbone_kwargs=json.dumps(backbone_size_kwargs(model) if backbone_kwargs is None else backbone_kwargs),
        base=base or "unknown",
        **extra,
    )
    return write_adapter_file(path, adapter_state_dict(model), metadata)


def _check_fits(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: str) -> None:
    """Every key of `own` in `state` with its shape, and nothing else; else an `AdapterError` naming the
    first key at fault (in the model's order)."""
    missing = [name for name in own if name not in state]
    unexpected = sorted(set(state) - set(own))
    if missing:
        raise AdapterError(f"{source} is missing '{missing[0]}' ({len(missing)} missing key(s))")
    if unexpected:
        raise AdapterError(f"{source} has unexpected key '{unexpected[0]}' ({len(unexpected)} in all)")
    for name, p in own.items():
        if tuple(state[name].shape) != tuple(p.shape):
            raise AdapterError(
                f"{source}: adapter tensor '{name}' has shape {tuple(state[name].shape)}, "
                f"the model needs {tuple(p.shape)} (another backbone?)"
            )


def _meta_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` with every tensor on the meta device (no memory): to try an adapter on first."""
    memo: dict[int, Any] = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def load_adapter(model: nn.Module, source: dict[str, torch.Tensor] | str | Path) -> nn.Module:
    """Copy adapter tensors into a model; every key and shape must match, else nothing is changed.

    `source` is a state dict (`adapter_state_dict`) for an adapted model, or an adapter file
    (`save_adapter`, a run's train/adapter.safetensors): a plain timm model then gets the file's adapter
    attached first (its method, options and new head, PEFT-style); an adapted one must carry the file's
    method. A backbone of another shape is an `AdapterError` naming the first tensor that does not fit."""
    if isinstance(source, dict):
        state, where = source, "adapter state"
        _check_fits(dict(trainable_named_parameters(model)), state, where)
    else:
        state, metadata = read_adapter_file(source)
        method, options, num_classes = file_method(source, metadata)
        where = str(source)
        record = getattr(model, RECORD_ATTR, None)
        if record is not None and record.method != method:
            raise AdapterError(f"{where} holds a '{method}' adapter, the model has a '{record.method}' one")
        if record is None:  # try the file's adapter on a tensor-less copy, so a misfit changes nothing
            trial = adapt(_meta_copy(model), method, num_classes=num_classes, **options)
            _check_fits(dict(trainable_named_parameters(trial)), state, where)
            adapt(model, method, num_classes=num_classes, **options)
        _check_fits(dict(trainable_named_parameters(model)), state, where)
    with torch.no_grad():
        for name, p in trainable_named_parameters(model):
            p.copy_(state[name])
    return model


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """backbone_params (base, head excluded), adapter_params (trainable, head excluded), head_params."""
    head_ids = {id(p) for _, p in _head_named_parameters(model)}
    added = sum(p.numel() for _, p in _adapter_named_parameters(model))
    trainable = sum(p.numel() for _, p in trainable_named_parameters(model) if id(p) not in head_ids)
    head = sum(p.numel() for _, p in _head_named_parameters(model))
    total = sum(p.numel() for p in model.parameters())
    return {"backbone_params": total - added - head, "adapter_params": trainable, "head_params": head}
