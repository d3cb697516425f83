"""The run config: dataclasses read from and written to YAML. `None` means "not set".

`load_config` resolves every value (see `vitfold.pipeline.recipes` for the order), so the config a run
saves says exactly what ran.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from vitfold.errors import VitfoldError
from vitfold.pipeline.recipes import method_train_defaults, resolve_recipe


@dataclass
class TrainConfig:
    epochs: int | None = None
    batch_size: int | None = None  # global batch (split over DDP processes)
    lr: float | None = None
    weight_decay: float | None = None  # not applied to names containing "bias" or "norm"
    warmup_epochs: float | None = None
    warmup_lr: float | None = None
    min_lr: float | None = None
    drop_path: float | None = None
    hflip: bool | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    label_smoothing: float = 0.0
    eval_every: int = 1
    num_workers: int = 0
    device: str = "auto"  # auto | cpu | cuda
    compile: bool = False  # torch.compile the training forward/backward (fewer kernel launches on a GPU)


@dataclass
class ExportConfig:
    formats: list[str] = field(default_factory=lambda: ["onnx", "torchscript", "aoti"])
    precision: str = "fp32"
    opset: int = 18
    device: str = "cpu"  # the AOTInductor package's device
    triton: str | None = None  # also write a Triton model repository into this folder


@dataclass
class VerifyConfig:
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    samples: int = 16  # evaluation images, and as many random images
    backends: list[str] | None = None  # None: every available export
    device: str = "cpu"
    tolerances: dict[str, float] = field(default_factory=dict)  # max_rel, cosine_min, top1_min


@dataclass
class BenchConfig:
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 32])
    backends: list[str] | None = None  # None: every available backend
    device: str = "cpu"
    threads: int | None = None
    min_iters: int = 50
    min_seconds: float = 3.0
    warmup_seconds: float = 0.2


@dataclass
class RunConfig:
    backbone: str = "vit_tiny_patch16_224"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. img_size, patch_size, depth
    checkpoint: str | None = None  # local weights for the backbone
    pretrained: bool = False  # hub weights (needs network)
    data: str = "digits"
    method: str = "rlrr"
    method_options: dict[str, Any] = field(default_factory=dict)  # e.g. init, rank, scale
    recipe: str | None = None
    num_classes: int | None = None  # None: the dataset's class count
    seed: int = 0
    train: TrainConfig = field(default_factory=TrainConfig)
    # `vitfold run` only: pre-train the backbone first ({data, train}), and the methods to compare with
    # ({method: {method_options, train}}); the stages' settings.
    pretrain: dict[str, Any] | None = None
    compare: dict[str, dict[str, Any]] = field(default_factory=dict)
    export: ExportConfig = field(default_factory=ExportConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["train"] = {k: list(v) if isinstance(v, tuple) else v for k, v in data["train"].items()}
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


TRAINING_KEYS = (
    "backbone",
    "backbone_kwargs",
    "checkpoint",
    "pretrained",
    "data",
    "method",
    "method_options",
    "recipe",
    "num_classes",
    "seed",
    "train",
)


def training_params(cfg: RunConfig) -> dict[str, Any]:
    """The part of the config that decides what training computes (not pretrain/compare/export/...)."""
    data = cfg.to_dict()
    return {k: data[k] for k in TRAINING_KEYS}


SECTIONS = {"export": ExportConfig, "verify": VerifyConfig, "bench": BenchConfig}


def _check_keys(data: dict[str, Any], cls: type, where: str) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise VitfoldError(f"{where}: unknown key '{unknown[0]}' (known: {', '.join(sorted(known))})")


def _read_yaml(path: str | Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise VitfoldError(f"cannot read config {path}: {e}") from None
    if not isinstance(data, dict):
        raise VitfoldError(f"config {path}: expected a mapping at the top level")
    return data


def load_config(path: str | Path | None = None, train: dict[str, Any] | None = None, **overrides: Any) -> RunConfig:
    """Defaults < method's paper recipe < `recipe` < config file < non-None `overrides` (and `train`)."""
    data = _read_yaml(path) if path is not None else {}
    where = f"config {path}" if path is not None else "config"
    _check_keys(data, RunConfig, where)
    for key, cls in SECTIONS.items():
        section = data.get(key) or {}
        if not isinstance(section, dict):
            raise VitfoldError(f"{where}: '{key}' must be a mapping")
        _check_keys(section, cls, f"{where}: {key}")
        data[key] = cls(**section)
    user_train = dict(data.pop("train", None) or {})
    _check_keys(user_train, TrainConfig, f"{where}: train")
    data.update({k: v for k, v in overrides.items() if v is not None})
    user_train.update({k: v for k, v in (train or {}).items() if v is not None})

    method = data.get("method", RunConfig.method)
    train_values, options = method_train_defaults(method), {}
    if data.get("recipe"):
        recipe_method, train_values, options = resolve_recipe(data["recipe"])
        if "method" in data and data["method"] != recipe_method:
            raise VitfoldError(f"recipe '{data['recipe']}' is for method '{recipe_method}', not '{data['method']}'")
        data["method"] = recipe_method
    train_values.update(user_train)
    for key in ("mean", "std"):
        if train_values.get(key) is not None:
            train_values[key] = tuple(float(v) for v in train_values[key])
    data["method_options"] = {**options, **(data.get("method_options") or {})}
    return RunConfig(**data, train=TrainConfig(**train_values))
