"""The run's three PyTorch models: unmerged (base + adapter, the reference), folded, and plain base."""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open
from torch import nn

from pipeline.config import RunConfig, load_config
from pipeline.errors import VitfoldError
from pipeline.manifest import verified_input


def run_config(run_dir: Path) -> RunConfig:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise VitfoldError(f"{run_dir} is not a run directory: {path} not found")
    return load_config(path)


def _num_classes(path: Path) -> int:
    with safe_open(path, "pt") as f:
        return int((f.metadata() or {})["num_classes"])


def folded_model(run_dir: Path) -> nn.Module:
    """fold/model.safetensors as a plain timm model, loaded by timm alone (the call the fold stage records)."""
    import timm

    cfg = run_config(run_dir)
    path = verified_input(run_dir, run_dir / "fold" / "model.safetensors", "fold")
    num_classes = _num_classes(path)
    overlay = {"file": str(path), "num_classes": num_classes, "custom_load": False}  # see pipeline.fold_stage
    model = timm.create_model(
        cfg.backbone, pretrained=True, num_classes=num_classes, pretrained_cfg_overlay=overlay, **cfg.backbone_kwargs
    )
    return model.eval()


def unmerged_model(run_dir: Path) -> nn.Module:
    """The base backbone with the trained adapter attached, exactly as training evaluated it."""
    from safetensors.torch import load_file

    from pipeline.adapting import load_adapter
    from pipeline.train import build_model

    cfg = run_config(run_dir)
    path = verified_input(run_dir, run_dir / "train" / "adapter.safetensors", "train")
    return load_adapter(build_model(cfg, _num_classes(path)), load_file(path)).eval()


def base_model(run_dir: Path) -> nn.Module:
    """The plain base architecture with the run's head size and no adapter (weights do not matter: latency)."""
    import timm

    cfg = run_config(run_dir)
    num_classes = _num_classes(verified_input(run_dir, run_dir / "fold" / "model.safetensors", "fold"))
    return timm.create_model(cfg.backbone, num_classes=num_classes, **cfg.backbone_kwargs).eval()
