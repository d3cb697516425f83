"""Checkpoints written by the papers' official code, read into vitfold's adapters and timm's backbone.

imported = read_official("rlrr", "cifar 91.20.pth")          # or "efft2", options={"scale": 1}
imported.adapter    # vitfold adapter + head tensors (load_adapter), imported.backbone: timm names
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vitfold.errors import CheckpointError, VitfoldError
from vitfold.names import OFFICIAL_METHODS
from vitfold.pipeline.backbones import read_state_dict
from vitfold.pipeline.official.efft import convert_efft2
from vitfold.pipeline.official.rlrr import convert_rlrr
from vitfold.pipeline.official.state import OfficialImport, OfficialState, check_imported


def read_official(method: str, path: str | Path, options: dict[str, Any] | None = None) -> OfficialImport:
    """The official `method` checkpoint at `path` in vitfold's terms; `options` are vitfold method options
    the checkpoint does not hold (EFFT2: `scale`). Every tensor of the file must be mapped."""
    if method not in OFFICIAL_METHODS:
        raise VitfoldError(
            f"official checkpoints are read for {', '.join(OFFICIAL_METHODS)}", argument="method", value=method
        )
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"official checkpoint not found: {path}")
    state = OfficialState(read_state_dict(path), path, method)
    imported = convert_rlrr(state) if method == "rlrr" else convert_efft2(state, dict(options or {}))
    return check_imported(imported, path)


__all__ = ["OFFICIAL_METHODS", "OfficialImport", "read_official"]
