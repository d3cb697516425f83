"""Adapter files: one safetensors file per adapter, the tensors plus the metadata that makes it stand alone.

Metadata (strings): `format` (vitfold-adapter/1), `method`, `method_options` (JSON), `backbone` (the timm
name), `num_classes`, `new_head` (whether the file holds a new head), `vitfold_version`, and whatever the
writer adds (`save_adapter`: `backbone_kwargs` (JSON) and `base`, the base weights' identity or "unknown";
the run stage: the epoch, the checkpoint, ...).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from vitfold import __version__
from vitfold.errors import CheckpointError
from vitfold.pipeline.atomic import atomic_replace
from vitfold.pipeline.tensor_files import safetensors_bytes

FORMAT = "vitfold-adapter/1"


def adapter_file_metadata(
    method: str, options: dict[str, Any], backbone: str, num_classes: int, new_head: bool, **extra: Any
) -> dict[str, str]:
    """The metadata of an adapter file (every value a string, `extra` ones with `str`)."""
    return {
        "format": FORMAT,
        "method": method,
        "method_options": json.dumps(options),
        "backbone": backbone,
        "num_classes": str(num_classes),
        "new_head": json.dumps(new_head),
        "vitfold_version": __version__,
        **{k: str(v) for k, v in extra.items()},
    }


def write_adapter_file(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write `tensors` with `metadata` to `path` atomically (same content, same bytes)."""
    path = Path(path)
    atomic_replace(path, safetensors_bytes(tensors, metadata))
    return path


def read_adapter_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of an adapter file; a `CheckpointError` naming the file if it is not one."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"adapter file not found: {path}")
    try:
        with safe_open(path, "pt") as f:
            metadata = dict(f.metadata() or {})
        tensors = load_file(path)
    except Exception as e:  # noqa: BLE001 - any unreadable file is an input error naming the file
        raise CheckpointError(f"cannot read {path} as safetensors: {e}") from None
    if "method" not in metadata:
        raise CheckpointError(f"{path} is not a vitfold adapter file (its metadata names no method)")
    return tensors, metadata


def file_method(path: str | Path, metadata: dict[str, str]) -> tuple[str, dict[str, Any], int | None]:
    """(method, options, num_classes of the new head or None) recorded in an adapter file's metadata."""
    try:
        options = json.loads(metadata.get("method_options") or "{}")
        new_head = json.loads(metadata.get("new_head", "true"))  # older run files: always a new head
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: unreadable adapter metadata ({e})") from None
    num_classes = int(metadata["num_classes"]) if new_head and metadata.get("num_classes") else None
    return metadata["method"], options, num_classes
