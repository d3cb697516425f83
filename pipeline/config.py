"""The run config: one dataclass, read from and written to YAML. `None` means "not set"."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import VitfoldError


@dataclass
class RunConfig:
    backbone: str = "vit_tiny_patch16_224"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. img_size, patch_size, depth
    method: str = "rlrr"
    method_options: dict[str, Any] = field(default_factory=dict)  # e.g. init, rank, scale
    num_classes: int | None = None
    seed: int = 0

    def to_yaml(self) -> str:
        return yaml.safe_dump(asdict(self), sort_keys=False)


def load_config(path: str | Path | None, **overrides: Any) -> RunConfig:
    """Read a YAML run config (or the defaults), then apply the non-None `overrides`."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise VitfoldError(f"cannot read config {path}: {e}") from None
        if not isinstance(data, dict):
            raise VitfoldError(f"config {path}: expected a mapping at the top level")
    known = {f.name for f in fields(RunConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise VitfoldError(f"config {path}: unknown key '{unknown[0]}' (known: {', '.join(sorted(known))})")
    data.update({k: v for k, v in overrides.items() if v is not None})
    return RunConfig(**data)
