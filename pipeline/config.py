"""The run config: dataclasses read from and written to YAML. `None` means "not set".

`load_config` resolves every value (see `vitfold.pipeline.recipes` for the order), so the config a run
saves says exactly what ran.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
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
    weight_decay: float | None = None  # grouped by the method's official rule (AdapterMethod.no_weight_decay)
    warmup_epochs: float | None = None
    warmup_lr: float | None = None
    min_lr: float | None = None
    schedule: str = "step-cosine"  # step-cosine | epoch-cosine | warm-restarts (vitfold.pipeline.schedules)
    cooldown_epochs: int = 0  # epochs at min_lr after `epochs` (the official RLRR loop: 100 + 10)
    restart_epochs: int = 5  # warm-restarts: epochs of the first cosine cycle (T_0)
    restart_mult: int = 1  # warm-restarts: each cycle this many times the one before (T_mult)
    drop_last: bool = True  # drop the last partial batch of an epoch (RLRR's official loaders keep it)
    drop_path: float | None = None
    drop_path_mode: str = "sample"  # sample: timm's DropPath | elementwise: nn.Dropout on each branch | official:
    # the official RLRR model's (elementwise on a ViT, sample on a Swin)
    select: str = "last"  # which epoch's adapter is folded: last | best-val (best on the validation split)
    hflip: bool | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    label_smoothing: float = 0.0
    mixup_alpha: float = 0.0  # Mixup's Beta(α, α) per batch (0: off); timm Mixup with cutmix_alpha, soft targets
    cutmix_alpha: float = 0.0  # CutMix's Beta(α, α) (0: off); with both on, each batch takes one (p = 0.5)
    ema_decay: float | None = None  # an EMA of the weights (timm ModelEmaV3): what is evaluated and folded
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 (with a GradScaler) | fp32
    eval_every: int = 1
    num_workers: int = 0
    device: str = "auto"  # auto | cpu | cuda
    compile: bool = False  # torch.compile the training forward/backward (fewer kernel launches on a GPU)

    @property
    def total_epochs(self) -> int:
        """`epochs` and the cool-down after them."""
        return self.epochs + self.cooldown_epochs


@dataclass
class FoldConfig:
    base_mismatch_ok: bool = False  # fold onto base weights other than the ones the adapter was trained on


@dataclass
class ExportConfig:
    formats: list[str] = field(default_factory=lambda: ["onnx", "torchscript", "aoti"])
    precision: str = "fp32"  # fp16, bf16 or int8 add reduced-precision artifacts beside the fp32 ones
    opset: int = 18
    calibration_samples: int = 256  # int8 static: seeded training images its activation ranges come from
    int8_mode: str = "static"  # static (QDQ, calibrated) | dynamic (activation ranges per call)
    int8_head: bool = True  # quantize the classifier head too
    device: str = "cpu"  # the AOTInductor package's device
    triton: str | None = None  # also write a Triton model repository into this folder
    triton_name: str | None = None  # its models' name prefix (None: the backbone's architecture)
    triton_max_batch: int | None = None  # its max_batch_size (None: the largest of verify.batch_sizes)
    triton_force: bool = False  # replace model folders that this run's export did not write


@dataclass
class VerifyConfig:
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    samples: int = 16  # evaluation images, and as many random images
    backends: list[str] | None = None  # None: every available export
    device: str = "cpu"
    # max_rel, cosine_min, top1_min, split_top1_min, accuracy_delta_min for every precision that has the
    # bar, or {precision: {...}} for one
    tolerances: dict[str, Any] = field(default_factory=dict)
    eval_images: int | None = None  # accuracy and agreement on the evaluation split: None = all of it
    allow_no_export: bool = False  # pass with the fold checked alone (otherwise verify needs an artifact)


@dataclass
class BenchConfig:
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 32])
    backends: list[str] | None = None  # None: every available backend
    device: str = "cpu"
    threads: int | None = None
    min_iters: int = 50  # calls per row, at least; and
    min_seconds: float = 3.0  # seconds per row, at least
    warmup_seconds: float = 0.2
    rounds: int = 10  # interleaved rounds over which the calls are spread
    unstable_above: float = 0.1  # a row whose per-round means' IQR / median exceeds this is unstable
    spin: bool = False  # ONNX Runtime's idle threads spin after a call (they would take the next backend's cores)
    roofline: bool = True  # CPU: measure each precision's matmul peak here; rows get GFLOP/s and % of it


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
    seeds: list[int] | None = None  # `vitfold run`: the comparison trains every method with each (None: `seed`)
    train: TrainConfig = field(default_factory=TrainConfig)
    # `vitfold run` only: pre-train the backbone first ({data, train}), and the methods to compare with
    # ({method: {method_options, train}}); the stages' settings.
    pretrain: dict[str, Any] | None = None
    compare: dict[str, dict[str, Any]] = field(default_factory=dict)
    fold: FoldConfig = field(default_factory=FoldConfig)
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


TRAIN_PRECISIONS = ("auto", "bf16", "fp16", "fp32")  # the training autocast (vitfold.pipeline.training)
SELECT = ("last", "best-val")  # the epoch folded: the last one, or the best on the validation split

SECTIONS = {"fold": FoldConfig, "export": ExportConfig, "verify": VerifyConfig, "bench": BenchConfig}


def _check_keys(data: dict[str, Any], cls: type, where: str) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise VitfoldError(f"{where}: unknown key '{unknown[0]}' (known: {', '.join(sorted(known))})")


SHIPPED_CONFIGS = Path(__file__).with_name("configs")  # packaged with the wheel: `--config demo`


def shipped_configs() -> list[str]:
    """The names of the configs that ship inside the package (`vitfold run --config NAME`)."""
    return sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.yaml"))


def config_file(name_or_path: str | Path) -> Path:
    """A config path as given, or a shipped config's path for its bare name ("demo", "demo.yaml")."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = SHIPPED_CONFIGS / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
    if path.parent == Path(".") and shipped.is_file():
        return shipped
    raise VitfoldError(
        f"config file not found: {name_or_path} (a YAML path, or one of the shipped configs: "
        f"{', '.join(shipped_configs())})"
    )


def _read_yaml(path: str | Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise VitfoldError(f"cannot read config {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:  # one line: where, and what the parser found
        mark = getattr(e, "problem_mark", None)
        at = f", line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        raise VitfoldError(f"config {path}{at}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(data, dict):
        raise VitfoldError(f"config {path}: expected a mapping at the top level")
    return data


def load_config(
    path: str | Path | None = None, train: dict[str, Any] | None = None, check: bool = True, **overrides: Any
) -> RunConfig:
    """Defaults < method's paper recipe < `recipe` < config file < non-None `overrides` (and `train`); an
    override of a section (`export`, `verify`, ...) may be a mapping of some of its fields. `check=False`
    leaves out `check_config` (it imports torch): only for a config compared with one checked before."""
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
    for key, value in overrides.items():
        if key in SECTIONS and isinstance(value, dict):  # a section's mapping changes the file's section
            _check_keys(value, SECTIONS[key], f"{where}: {key}")
            overrides[key] = replace(data[key], **value)
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
        value = train_values.get(key)
        if value is not None:
            numbers = isinstance(value, list | tuple) and all(_is_number(x, -math.inf) for x in value)
            if not numbers or len(value) != 3:
                raise VitfoldError(f"{where}: train.{key} must be three numbers (R, G, B), got {value!r}")
            train_values[key] = tuple(float(x) for x in value)
    if not isinstance(data.get("method_options") or {}, dict):
        raise VitfoldError(f"{where}: method_options must be a mapping, got {data['method_options']!r}")
    data["method_options"] = {**options, **(data.get("method_options") or {})}
    cfg = RunConfig(**data, train=TrainConfig(**train_values))
    if check:
        check_config(cfg, where)
    return cfg


def _is_int(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _is_number(value: Any, least: float, below: float = math.inf) -> bool:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return ok and least <= value < below


def _is_device(value: Any, auto: bool = False) -> bool:
    kinds = ("cpu", "cuda", "auto") if auto else ("cpu", "cuda")
    name, _, index = str(value).partition(":")
    return isinstance(value, str) and name in kinds and (not index or (index.isdigit() and name == "cuda"))


def _seeds(value: Any) -> bool:
    return (
        isinstance(value, list) and bool(value) and all(_is_int(s, 0) for s in value) and len(set(value)) == len(value)
    )


def _names(value: Any) -> bool:
    """None (every available one), or a non-empty list of names."""
    return value is None or isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)


def _batch_sizes(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(_is_int(b, 1) for b in value)


def check_config(cfg: RunConfig, where: str = "config") -> None:
    """Refuse, naming the key, any value that would fail later (or silently do the wrong thing):
    checked when the config loads, before anything is written."""
    from vitfold.export import FORMATS, PRECISIONS
    from vitfold.export.comparison import tolerances_for
    from vitfold.export.int8 import INT8_MODES
    from vitfold.names import ARTIFACT_BACKENDS, BACKENDS, DROP_PATH_MODES
    from vitfold.pipeline.adapters import get_method
    from vitfold.pipeline.schedules import SCHEDULES

    t, f, e, v, b = cfg.train, cfg.fold, cfg.export, cfg.verify, cfg.bench
    formats_ok = isinstance(e.formats, list) and bool(e.formats) and set(map(str, e.formats)) <= set(FORMATS)
    rules: list[tuple[str, Any, bool, str]] = [
        ("backbone", cfg.backbone, isinstance(cfg.backbone, str) and bool(cfg.backbone), "a timm model name"),
        ("backbone_kwargs", cfg.backbone_kwargs, isinstance(cfg.backbone_kwargs, dict), "a mapping"),
        ("method_options", cfg.method_options, isinstance(cfg.method_options, dict), "a mapping"),
        ("compare", cfg.compare, isinstance(cfg.compare, dict), "a mapping of method: settings"),
        ("pretrain", cfg.pretrain, cfg.pretrain is None or isinstance(cfg.pretrain, dict), "a mapping"),
        ("data", cfg.data, isinstance(cfg.data, str), "a data spec (digits, folder:PATH, vtab:PATH, fgvc:PATH)"),
        ("num_classes", cfg.num_classes, cfg.num_classes is None or _is_int(cfg.num_classes, 1), "a positive integer"),
        ("seed", cfg.seed, _is_int(cfg.seed, 0), "a non-negative integer"),
        ("seeds", cfg.seeds, cfg.seeds is None or _seeds(cfg.seeds), "a list of distinct non-negative integers"),
        ("train.epochs", t.epochs, _is_int(t.epochs, 1), "a positive integer"),
        ("train.batch_size", t.batch_size, _is_int(t.batch_size, 1), "a positive integer"),
        ("train.lr", t.lr, _is_number(t.lr, 0) and t.lr > 0, "a positive number"),
        ("train.weight_decay", t.weight_decay, _is_number(t.weight_decay, 0), "a number >= 0"),
        ("train.warmup_epochs", t.warmup_epochs, _is_number(t.warmup_epochs, 0), "a number >= 0"),
        ("train.warmup_lr", t.warmup_lr, _is_number(t.warmup_lr, 0), "a number >= 0"),
        ("train.min_lr", t.min_lr, _is_number(t.min_lr, 0), "a number >= 0"),
        ("train.schedule", t.schedule, t.schedule in SCHEDULES, " | ".join(SCHEDULES)),
        ("train.cooldown_epochs", t.cooldown_epochs, _is_int(t.cooldown_epochs, 0), "a non-negative integer"),
        ("train.restart_epochs", t.restart_epochs, _is_int(t.restart_epochs, 1), "a positive integer"),
        ("train.restart_mult", t.restart_mult, _is_int(t.restart_mult, 1), "a positive integer"),
        ("train.mixup_alpha", t.mixup_alpha, _is_number(t.mixup_alpha, 0), "a number >= 0"),
        ("train.cutmix_alpha", t.cutmix_alpha, _is_number(t.cutmix_alpha, 0), "a number >= 0"),
        ("train.ema_decay", t.ema_decay, t.ema_decay is None or _is_number(t.ema_decay, 0, 1), "a number in [0, 1)"),
        ("train.precision", t.precision, t.precision in TRAIN_PRECISIONS, " | ".join(TRAIN_PRECISIONS)),
        ("train.drop_last", t.drop_last, isinstance(t.drop_last, bool), "true or false"),
        ("train.drop_path", t.drop_path, t.drop_path is None or _is_number(t.drop_path, 0, 1), "a number in [0, 1)"),
        ("train.drop_path_mode", t.drop_path_mode, t.drop_path_mode in DROP_PATH_MODES, " | ".join(DROP_PATH_MODES)),
        ("train.select", t.select, t.select in SELECT, " | ".join(SELECT)),
        ("train.hflip", t.hflip, t.hflip is None or isinstance(t.hflip, bool), "true or false"),
        ("train.label_smoothing", t.label_smoothing, _is_number(t.label_smoothing, 0, 1), "a number in [0, 1)"),
        ("train.eval_every", t.eval_every, _is_int(t.eval_every, 1), "a positive integer"),
        ("train.num_workers", t.num_workers, _is_int(t.num_workers, 0), "a non-negative integer"),
        ("train.device", t.device, _is_device(t.device, auto=True), "auto, cpu or cuda"),
        ("train.compile", t.compile, isinstance(t.compile, bool), "true or false"),
        ("fold.base_mismatch_ok", f.base_mismatch_ok, isinstance(f.base_mismatch_ok, bool), "true or false"),
        ("export.formats", e.formats, formats_ok, f"a list of {', '.join(FORMATS)}"),
        ("export.precision", e.precision, e.precision in PRECISIONS, " or ".join(PRECISIONS)),
        ("export.opset", e.opset, _is_int(e.opset, 17), "an integer >= 17"),
        ("export.device", e.device, _is_device(e.device), "cpu or cuda[:N]"),
        ("export.calibration_samples", e.calibration_samples, _is_int(e.calibration_samples, 1), "a positive integer"),
        ("export.int8_mode", e.int8_mode, e.int8_mode in INT8_MODES, " or ".join(INT8_MODES)),
        ("export.int8_head", e.int8_head, isinstance(e.int8_head, bool), "true or false"),
        ("export.triton_name", e.triton_name, e.triton_name is None or isinstance(e.triton_name, str), "a string"),
        (
            "export.triton_max_batch",
            e.triton_max_batch,
            e.triton_max_batch is None or _is_int(e.triton_max_batch, 1),
            "a positive integer",
        ),
        ("export.triton_force", e.triton_force, isinstance(e.triton_force, bool), "true or false"),
        ("verify.batch_sizes", v.batch_sizes, _batch_sizes(v.batch_sizes), "a list of positive integers"),
        ("verify.samples", v.samples, _is_int(v.samples, 1), "a positive integer"),
        ("verify.device", v.device, _is_device(v.device), "cpu or cuda[:N]"),
        ("verify.eval_images", v.eval_images, v.eval_images is None or _is_int(v.eval_images, 1), "a positive integer"),
        ("verify.backends", v.backends, _names(v.backends), "a non-empty list of backend names"),
        ("verify.allow_no_export", v.allow_no_export, isinstance(v.allow_no_export, bool), "true or false"),
        ("bench.batch_sizes", b.batch_sizes, _batch_sizes(b.batch_sizes), "a list of positive integers"),
        ("bench.backends", b.backends, _names(b.backends), "a non-empty list of backend names"),
        ("bench.device", b.device, _is_device(b.device), "cpu or cuda[:N]"),
        ("bench.threads", b.threads, b.threads is None or _is_int(b.threads, 1), "a positive integer"),
        ("bench.min_iters", b.min_iters, _is_int(b.min_iters, 1), "a positive integer"),
        ("bench.min_seconds", b.min_seconds, _is_number(b.min_seconds, 0), "a number >= 0"),
        ("bench.warmup_seconds", b.warmup_seconds, _is_number(b.warmup_seconds, 0), "a number >= 0"),
        ("bench.rounds", b.rounds, _is_int(b.rounds, 1), "a positive integer"),
        (
            "bench.unstable_above",
            b.unstable_above,
            _is_number(b.unstable_above, 0) and b.unstable_above > 0,
            "a positive number",
        ),
        ("bench.spin", b.spin, isinstance(b.spin, bool), "true or false"),
        ("bench.roofline", b.roofline, isinstance(b.roofline, bool), "true or false"),
    ]
    for key, value, ok, expected in rules:
        if not ok:
            raise VitfoldError(f"{where}: {key} must be {expected}, got {value!r}")
    for std in t.std or ():
        if std <= 0:
            raise VitfoldError(f"{where}: train.std must be positive, got {list(t.std)}")
    if t.schedule == "warm-restarts" and t.warmup_epochs:
        raise VitfoldError(
            f"{where}: train.warmup_epochs must be 0 with train.schedule warm-restarts (it has no warm-up)"
        )
    if "drop_path_rate" in cfg.backbone_kwargs:
        raise VitfoldError(f"{where}: backbone_kwargs.drop_path_rate: set train.drop_path (and train.drop_path_mode)")
    try:
        get_method(cfg.method)(**cfg.method_options)
    except VitfoldError as error:
        raise VitfoldError(f"{where}: {error}") from None
    for key, names, known in (("verify", v.backends, ARTIFACT_BACKENDS), ("bench", b.backends, BACKENDS)):
        unknown = [name for name in names or [] if name not in known]
        if unknown:
            raise VitfoldError(
                f"{where}: {key}.backends: unknown backend '{unknown[0]}' (choose from {', '.join(known)})"
            )
    try:
        tolerances_for(v.tolerances)
    except VitfoldError as error:
        raise VitfoldError(f"{where}: verify.{error}") from None
