"""import-peft: a Hugging Face PEFT LoRA adapter folder (trained on a timm ViT or Swin) -> a run directory that
`fold`, `export` and `verify` take as if vitfold had trained it with method `lora`.

The base weights are the run's `--pretrained` or `--checkpoint` ones (a PEFT adapter holds none), or, when the
adapter changes them (LoRA outside vitfold's lora places, LoRA biases, tensors PEFT trained in place), those with
the changes merged, written to RUN/import/backbone.safetensors (the run's checkpoint). The head is the adapter's
(`modules_to_save=["head"]`) or else the base model's own (the checkpoint's head, or the hub model's). The key
mapping and what is refused: `vitfold.pipeline.peft_import`. A refused adapter leaves nothing behind
(the run directory is not even made).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from vitfold.errors import CheckpointError, VitfoldError
from vitfold.pipeline.backbones import read_state_dict
from vitfold.pipeline.config import RunConfig, check_config
from vitfold.pipeline.models import build_backbone
from vitfold.pipeline.peft_import import (
    HEAD,
    default_backbone,
    peft_to_lora,
    read_peft,
    read_peft_config,
    saves_head,
)
from vitfold.pipeline.stages.imported_run import new_run, write_imported_run
from vitfold.pipeline.stages.rundir import sha256
from vitfold.pipeline.stages.stage import Log


def peft_backbone(adapter_dir: str | Path) -> str:
    """The timm backbone the PEFT adapter at `adapter_dir` names (`base_model_name_or_path`: "timm/NAME"); a
    `VitfoldError` asking for --backbone when it names none."""
    config = read_peft_config(adapter_dir)
    name = default_backbone(config)
    if name is None:
        named = config.get("base_model_name_or_path")
        raise VitfoldError(
            f"{adapter_dir}: base_model_name_or_path = {named!r} is no timm hub name (timm/...): pass --backbone"
        )
    return name


def _base_head(config: RunConfig, base: nn.Module) -> dict[str, torch.Tensor]:
    """The classifier the base weights come with: the --checkpoint file's head tensors (build_backbone keeps
    a head of the checkpoint's size out: it makes the model at the default size), else the hub model's."""
    if not config.checkpoint:
        return {name: t for name, t in base.state_dict().items() if name.startswith(HEAD + ".")}
    checkpoint = Path(config.checkpoint)
    if checkpoint.suffix.lower() == ".npz":
        raise CheckpointError(
            f"{checkpoint}: the head of a Google .npz checkpoint is not read: save the head with the adapter "
            "(modules_to_save=['head']) or pass the base weights as .safetensors"
        )
    return {name: t for name, t in read_state_dict(checkpoint).items() if name.startswith(HEAD + ".")}


def import_peft(adapter_dir: str | Path, run_dir: str | Path, config: RunConfig, log: Log = print) -> Path:
    """Import the PEFT LoRA adapter folder `adapter_dir` into a new run directory with `config` (its backbone,
    base weights, data and stage settings; its method becomes `lora`). Returns the adapter file."""
    started = time.perf_counter()
    rd = new_run(run_dir)
    adapter = read_peft(adapter_dir)
    if not (config.checkpoint or config.pretrained):
        raise CheckpointError(
            f"{adapter.path} holds no backbone weights (a PEFT adapter never does): pass --pretrained (the hub "
            f"weights of {config.backbone} it was trained on) or --checkpoint PATH"
        )
    base = build_backbone(config)
    base_head = {} if saves_head(adapter.config) else _base_head(config, base)
    imported = peft_to_lora(adapter, base, base_head)
    num_classes = imported.num_classes
    cfg = replace(config, method="lora", method_options=imported.options, num_classes=num_classes)
    check_config(cfg, where="import-peft")
    origin = {"path": str(adapter.path.resolve()), "sha256": sha256(adapter.weights), "method": "peft-lora"}
    write_imported_run(rd, cfg, imported.adapter, origin, started, backbone=imported.backbone)
    layers, rank = len(imported.layers), imported.options["rank"]
    base_note = f" and the changed base weights into {rd.imported_backbone}" if imported.backbone else ""
    log(
        f"imported the PEFT LoRA adapter {adapter.path} ({layers} layers, rank {rank}, {num_classes} classes) "
        f"into {rd.adapter}{base_note}; next: vitfold fold {rd.path}"
    )
    return rd.adapter
