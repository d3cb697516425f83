"""Datasets for `vitfold train`: an ImageFolder tree, the VTAB-1k list layout, the FGVC layout of the
official RLRR loaders, and the UCI handwritten digits that ship inside vitfold (the offline default;
`demo_data/digits.csv.gz`, the 1,797 8x8 images of Alpaydin & Kaynak, UCI ML Repository, CC BY 4.0).

    --data digits            all ten classes        --data digits:5-9    classes 5..9, relabelled 0..4
    --data folder:PATH       PATH/train/<class>/*, PATH/val/ (or PATH/test/)
    --data vtab:PATH         PATH/train800val200.txt, train800.txt, val200.txt, test.txt: "relative/path label"
    --data fgvc:PATH         PATH named CUB_200_2011, NABirds, OxfordFlowers, StanfordCars or StanfordDogs,
                             holding trainval.json, train.json, val.json, test.json: {"relative/path": class id}
                             with the paths under PATH/images/ (CUB_200_2011, NABirds) or PATH/ (the others)

Splits: the model trains on one split and is evaluated on another (VTAB-1k: train800val200 and test; FGVC:
trainval and test). With a validation split (`validation=True`, for `train.select: best-val`) it trains on
the rest (VTAB-1k train800, FGVC train, folder train/) and the validation split (val200, val, val/) picks
the epoch, while evaluation stays on the test split.

Transforms follow the papers: resize to the model's input size (bicubic), a horizontal flip in training
where the recipe says, then normalisation with the recipe's or the backbone's mean and std. FGVC (the
official `get_transforms`): resize to 256/224 of the input size (bilinear), then a random crop in training
and the centre crop in evaluation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from vitfold.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
FGVC_CROP_PCT = 224 / 256  # the official FGVC evaluation: resize to 256 (for 224), centre crop 224
DIGITS_EVAL_FRACTION = 0.25  # fixed, stratified split of the 1,797 digits: same eval set for every seed
DIGITS_FILE = Path(__file__).with_name("demo_data") / "digits.csv.gz"  # rows: 64 grey levels 0..16, label


FGVC_IMAGE_DIRS = {  # the official loaders' dataset folders, and where their images are under them
    "CUB_200_2011": "images",
    "NABirds": "images",
    "OxfordFlowers": "",
    "StanfordCars": "",
    "StanfordDogs": "",
}


@dataclass(frozen=True)
class DataSpec:
    kind: str  # digits | folder | vtab | fgvc
    path: Path | None = None
    classes: tuple[int, ...] | None = None  # digits: the subset, relabelled 0..k-1 in this order


@dataclass
class Splits:
    train: Dataset
    eval: Dataset
    eval_split: str  # which split evaluates: val, test
    class_names: list[str]
    train_split: str = "train"  # which split trains: train, train800val200, train800, trainval
    select: Dataset | None = None  # the validation split that picks the epoch (train.select best-val)
    select_split: str | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def describe(self) -> dict[str, dict[str, Any] | None]:
        """Each role's split name and image count: {"train", "eval", "select"} -> {"split", "images"}."""
        roles = {"train": (self.train_split, self.train), "eval": (self.eval_split, self.eval)}
        described: dict[str, dict[str, Any] | None] = {
            role: {"split": name, "images": len(data)} for role, (name, data) in roles.items()
        }
        has_select = self.select is not None
        described["select"] = {"split": self.select_split, "images": len(self.select)} if has_select else None
        return described

    def check_eval(self) -> None:
        """Read every evaluation (and validation) image's header now (in-memory splits have nothing to check)."""
        for split in (self.eval, self.select):
            if isinstance(split, FileImages):
                split.check()


@dataclass(frozen=True)
class ImageTransform:
    """Resize (bicubic) to `size`, optional horizontal flip in training, normalise with `mean`/`std`.

    `crop` (FGVC): resize (bilinear) to ⌊`size` · 256/224⌋ instead, then crop `size`: at random in training,
    the centre in evaluation."""

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    hflip: bool = False
    crop: bool = False

    def pil(self, train: bool = True):
        """The torchvision transform of a PIL image, for the training split or (`train=False`) any other."""
        from torchvision import transforms as T

        if self.crop:
            resized = tuple(math.floor(s / FGVC_CROP_PCT) for s in self.size)
            steps = [T.Resize(resized), T.RandomCrop(self.size) if train else T.CenterCrop(self.size)]
        else:
            steps = [T.Resize(self.size, interpolation=T.InterpolationMode.BICUBIC)]
        steps += [T.RandomHorizontalFlip()] if self.hflip and train else []
        steps += [T.ToTensor(), T.Normalize(self.mean, self.std)]
        return T.Compose(steps)

    def data_config(self) -> dict[str, Any]:
        """The evaluation transform in timm's data-config keys (`timm.data.create_transform(**config)`
        rebuilds it): without `crop`, a squash resize to `size` (crop_pct 1, bicubic); with `crop`, a squash
        resize to ⌊size / FGVC_CROP_PCT⌋ (bilinear), then the centre crop of `size`."""
        crop_pct = FGVC_CROP_PCT if self.crop else 1.0
        return {
            "input_size": (3, *self.size),
            "interpolation": "bilinear" if self.crop else "bicubic",
            "mean": tuple(self.mean),
            "std": tuple(self.std),
            "crop_pct": crop_pct,
            "crop_mode": "squash",
        }


def parse_data_spec(spec: str) -> DataSpec:
    """`digits[:A-B|:A,B,...]`, `folder:PATH`, `vtab:PATH` or `fgvc:PATH`; a `DataError` naming the spec
    otherwise."""
    kind, _, rest = spec.partition(":")
    if kind == "digits":
        return DataSpec("digits", classes=_parse_classes(rest, spec) if rest else None)
    if kind in ("folder", "vtab", "fgvc"):
        if not rest:
            raise DataError(f"give a path, e.g. {kind}:/data/my_dataset", argument="data", value=spec)
        path = Path(rest).expanduser()
        if not path.is_dir():
            raise DataError(f"directory not found: {path}", argument="data", value=spec)
        if kind == "fgvc" and path.resolve().name not in FGVC_IMAGE_DIRS:
            raise DataError(
                f"the FGVC folder must be named as the official loaders name it "
                f"({', '.join(FGVC_IMAGE_DIRS)}), got '{path.resolve().name}'",
                argument="data",
                value=spec,
            )
        return DataSpec(kind, path=path)
    raise DataError(
        f"unknown kind '{kind}' (use digits, folder:PATH, vtab:PATH or fgvc:PATH)", argument="data", value=spec
    )


def _parse_classes(text: str, spec: str) -> tuple[int, ...]:
    try:
        if "-" in text:
            lo, hi = (int(t) for t in text.split("-"))
            classes = tuple(range(lo, hi + 1))
        else:
            classes = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise DataError("classes must look like 5-9 or 0,2,4", argument="data", value=spec) from None
    if not classes or not set(classes) <= set(range(10)) or len(set(classes)) != len(classes):
        raise DataError("digit classes must be distinct, within 0..9", argument="data", value=spec)
    return classes


def build_splits(spec: DataSpec, transform: ImageTransform, validation: bool = False) -> Splits:
    """The training split (flip as the transform says), the evaluation split (never flipped) and, with
    `validation`, a validation split held out of the training data (a `DataError` if the data has none)."""
    builders = {"digits": _digits, "folder": _folder, "vtab": _vtab, "fgvc": _fgvc}
    return builders[spec.kind](spec, transform, validation)


def class_names(spec: DataSpec, transform: ImageTransform, validation: bool = False) -> list[str]:
    """The ordered class names, name i labelling logit i, without decoding an image: the digits themselves
    (`digits:5-9` -> "5" ... "9"), the class folders of folder:PATH/train, the labels of the VTAB-1k lists
    or the class ids of the FGVC split files (as `build_splits` numbers them)."""
    if spec.kind == "digits":
        return _digit_names(spec)
    return build_splits(spec, transform, validation).class_names  # file datasets open no image until read


def _no_validation(spec: DataSpec, why: str) -> DataError:
    return DataError(f"train.select best-val: {spec.kind} data {why}; use train.select last")


# -- digits -------------------------------------------------------------------------------------------


def _digits_tensor(images: torch.Tensor, transform: ImageTransform) -> torch.Tensor:
    """[N, 64] grey levels 0..16 -> [N, 3, H, W] normalised, upscaled bicubically."""
    x = (images.view(-1, 1, 8, 8) / 16.0).repeat(1, 3, 1, 1)  # [N, 3, 8, 8] in [0, 1]
    x = F.interpolate(x, size=transform.size, mode="bicubic", align_corners=False).clamp_(0, 1)
    mean = torch.tensor(transform.mean).view(1, 3, 1, 1)
    std = torch.tensor(transform.std).view(1, 3, 1, 1)
    return (x - mean) / std


class _FlipDataset(Dataset):
    """Random horizontal flip over an in-memory [N, C, H, W] tensor dataset (training only)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = self.images[i]
        return (x.flip(-1) if torch.rand(()) < 0.5 else x), self.labels[i]


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The shipped UCI digits: images [1797, 64] (grey levels 0..16, float32) and labels [1797] (int64)."""
    import gzip

    with gzip.open(DIGITS_FILE, "rt") as f:
        rows = torch.tensor([[int(v) for v in line.split(",")] for line in f if line.strip()])  # [1797, 65]
    return rows[:, :64].float(), rows[:, 64].long()


def stratified_split(labels: torch.Tensor, eval_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Indices (train, eval): each class gives round(eval_fraction * its count) of its examples to eval,
    drawn by a generator seeded with `seed`, so every call (and every training seed) gets the same split."""
    g = torch.Generator().manual_seed(seed)
    train, held_out = [], []
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=g)].tolist()
        n_eval = round(eval_fraction * len(members))
        held_out += members[:n_eval]
        train += members[n_eval:]
    return sorted(train), sorted(held_out)


def _digits(spec: DataSpec, transform: ImageTransform, validation: bool) -> Splits:
    if validation:
        raise _no_validation(spec, "has no validation split apart from its evaluation split")
    all_images, all_labels = load_digits()
    classes = spec.classes or tuple(range(10))
    keep = [i for i, y in enumerate(all_labels.tolist()) if y in classes]
    relabel = {c: i for i, c in enumerate(classes)}
    images = all_images[keep]  # [N, 64]
    labels = torch.tensor([relabel[int(y)] for y in all_labels[keep]])
    train_idx, eval_idx = stratified_split(labels, DIGITS_EVAL_FRACTION)
    x = _digits_tensor(images, transform)
    train_x, train_y = x[train_idx], labels[train_idx]
    train = _FlipDataset(train_x, train_y) if transform.hflip else TensorDataset(train_x, train_y)
    return Splits(train, TensorDataset(x[eval_idx], labels[eval_idx]), "val", _digit_names(spec))


def _digit_names(spec: DataSpec) -> list[str]:
    return [str(c) for c in spec.classes or range(10)]


# -- image files --------------------------------------------------------------------------------------


def load_rgb(path: Path):
    """The image at `path` as RGB; a `DataError` naming the file when it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot read image {path}: {e}") from None


class FileImages(Dataset):
    """(path, label) pairs read with `load_rgb` and transformed."""

    def __init__(self, samples: list[tuple[Path, int]], transform) -> None:
        self.samples, self.transform = samples, transform

    def check(self) -> None:
        """Open every image's header (no decoding): a missing or corrupt file fails now, by name, not
        after hours of training."""
        from PIL import Image

        for path, _ in self.samples:
            try:
                with Image.open(path) as image:
                    image.verify()
            except (OSError, ValueError, SyntaxError) as e:
                raise DataError(f"cannot read image {path}: {e}") from None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        return self.transform(load_rgb(path)), label


def _scan_split(split_dir: Path, classes: list[str]) -> list[tuple[Path, int]]:
    samples = []
    for label, name in enumerate(classes):
        class_dir = split_dir / name
        files = (
            sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if class_dir.is_dir() else []
        )
        if not files and (class_dir.is_dir() or split_dir.name == "train"):  # an empty folder is a mistake
            raise DataError(f"class folder {class_dir} has no images")
        samples += [(p, label) for p in files]
    if not samples:
        raise DataError(f"split {split_dir} has no images")
    return samples


def _folder(spec: DataSpec, transform: ImageTransform, validation: bool) -> Splits:
    root = spec.path
    train_dir = root / "train"
    eval_dir = next((root / s for s in ("val", "test") if (root / s).is_dir()), None)
    if not train_dir.is_dir() or eval_dir is None:
        raise DataError(f"{root}: expected train/ and val/ (or test/) sub-folders of class folders")
    if validation and not ((root / "val").is_dir() and (root / "test").is_dir()):
        raise _no_validation(spec, f"at {root} needs both val/ (to select on) and test/ (to evaluate on)")
    select_dir = root / "val" if validation else None
    eval_dir = root / "test" if validation else eval_dir
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{train_dir}: no class folders")
    for split_dir in filter(None, (eval_dir, select_dir)):
        extra = sorted({p.name for p in split_dir.iterdir() if p.is_dir()} - set(classes))
        if extra:
            raise DataError(f"{split_dir / extra[0]}: class not present in {train_dir}")
    train = FileImages(_scan_split(train_dir, classes), transform.pil())
    evaluation = FileImages(_scan_split(eval_dir, classes), transform.pil(train=False))
    select = FileImages(_scan_split(select_dir, classes), transform.pil(train=False)) if select_dir else None
    return Splits(train, evaluation, eval_dir.name, classes, "train", select, "val" if select_dir else None)


def _read_list(path: Path, root: Path) -> list[tuple[Path, int]]:
    if not path.is_file():
        raise DataError(f"VTAB list file not found: {path}")
    samples = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise DataError(f"{path}:{number}: expected 'relative/path label', got '{line}'")
        image = root / parts[0]
        if not image.is_file():
            raise DataError(f"{path}:{number}: image not found: {image}")
        samples.append((image, int(parts[1])))
    if not samples:
        raise DataError(f"{path}: no images listed")
    return samples


def _vtab(spec: DataSpec, transform: ImageTransform, validation: bool) -> Splits:
    root = spec.path
    train_split = "train800" if validation else "train800val200"
    train = _read_list(root / f"{train_split}.txt", root)
    test = _read_list(root / "test.txt", root)
    val = _read_list(root / "val200.txt", root) if validation else []
    listed = train + test + val
    num_classes = max(label for _, label in listed) + 1
    if min(label for _, label in listed) < 0:
        raise DataError(f"{root}: negative class label in the list files")
    return Splits(
        FileImages(train, transform.pil()),
        FileImages(test, transform.pil(train=False)),
        "test",
        [str(i) for i in range(num_classes)],
        train_split,
        FileImages(val, transform.pil(train=False)) if validation else None,
        "val200" if validation else None,
    )


def _read_json_split(path: Path, images: Path) -> dict[Path, Any]:
    """An official FGVC split file: {"relative/path": class id} -> {image path: class id}."""
    import json

    if not path.is_file():
        raise DataError(f"FGVC split file not found: {path}")
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read FGVC split file {path}: {e}") from None
    if not isinstance(entries, dict) or not entries:
        raise DataError(f"{path}: expected a non-empty mapping of 'relative/path': class id")
    missing = next((name for name in entries if not (images / name).is_file()), None)
    if missing is not None:
        raise DataError(f"{path}: image not found: {images / missing}")
    return {images / name: label for name, label in entries.items()}


def _fgvc(spec: DataSpec, transform: ImageTransform, validation: bool) -> Splits:
    """The official FGVC splits; class ids (any sortable ids) are numbered 0..k-1 in sorted order over the
    splits read, so every split labels a class the same way."""
    root = spec.path
    images = root / FGVC_IMAGE_DIRS[root.resolve().name]
    names = ("train", "test", "val") if validation else ("trainval", "test")
    splits = {name: _read_json_split(root / f"{name}.json", images) for name in names}
    class_ids = sorted({label for split in splits.values() for label in split.values()})
    number = {c: i for i, c in enumerate(class_ids)}

    def files(name: str, train: bool) -> FileImages:
        return FileImages([(path, number[c]) for path, c in splits[name].items()], transform.pil(train=train))

    select = files("val", train=False) if validation else None
    return Splits(
        files(names[0], train=True),
        files("test", train=False),
        "test",
        [str(c) for c in class_ids],
        names[0],
        select,
        "val" if validation else None,
    )
