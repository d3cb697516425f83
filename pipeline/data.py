"""Datasets for `vitfold train`: an ImageFolder tree, the VTAB-1k list layout, and the UCI digits that
ship inside scikit-learn (the offline default).

    --data digits            all ten classes        --data digits:5-9    classes 5..9, relabelled 0..4
    --data folder:PATH       PATH/train/<class>/*, PATH/val/ (or PATH/test/)
    --data vtab:PATH         PATH/train800val200.txt, PATH/test.txt: "relative/path label" per line

Transforms follow the papers: resize to the model's input size (bicubic), a horizontal flip in training
where the recipe says, then normalisation with the recipe's or the backbone's mean and std.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from vitfold.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
DIGITS_EVAL_FRACTION = 0.25  # fixed, stratified split of the 1,797 digits: same eval set for every seed


@dataclass(frozen=True)
class DataSpec:
    kind: str  # digits | folder | vtab
    path: Path | None = None
    classes: tuple[int, ...] | None = None  # digits: the subset, relabelled 0..k-1 in this order


@dataclass
class Splits:
    train: Dataset
    eval: Dataset
    eval_split: str  # which split evaluates: val, test
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def check_eval(self) -> None:
        """Read every evaluation image's header now (in-memory splits have nothing to check)."""
        if isinstance(self.eval, FileImages):
            self.eval.check()


@dataclass(frozen=True)
class ImageTransform:
    """Resize (bicubic) to `size`, optional horizontal flip, normalise with `mean`/`std`."""

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    hflip: bool = False

    def pil(self):
        from torchvision import transforms as T

        steps = [T.Resize(self.size, interpolation=T.InterpolationMode.BICUBIC)]
        steps += [T.RandomHorizontalFlip()] if self.hflip else []
        steps += [T.ToTensor(), T.Normalize(self.mean, self.std)]
        return T.Compose(steps)


def parse_data_spec(spec: str) -> DataSpec:
    """`digits[:A-B|:A,B,...]`, `folder:PATH` or `vtab:PATH`; a `DataError` naming the spec otherwise."""
    kind, _, rest = spec.partition(":")
    if kind == "digits":
        return DataSpec("digits", classes=_parse_classes(rest, spec) if rest else None)
    if kind in ("folder", "vtab"):
        if not rest:
            raise DataError(f"--data {spec}: give a path, e.g. {kind}:/data/my_dataset")
        path = Path(rest).expanduser()
        if not path.is_dir():
            raise DataError(f"--data {spec}: directory not found: {path}")
        return DataSpec(kind, path=path)
    raise DataError(f"--data {spec}: unknown kind '{kind}' (use digits, folder:PATH or vtab:PATH)")


def _parse_classes(text: str, spec: str) -> tuple[int, ...]:
    try:
        if "-" in text:
            lo, hi = (int(t) for t in text.split("-"))
            classes = tuple(range(lo, hi + 1))
        else:
            classes = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise DataError(f"--data {spec}: classes must look like 5-9 or 0,2,4") from None
    if not classes or not set(classes) <= set(range(10)) or len(set(classes)) != len(classes):
        raise DataError(f"--data {spec}: digit classes must be distinct, within 0..9")
    return classes


def build_splits(spec: DataSpec, transform: ImageTransform) -> Splits:
    """The training split (flip as the transform says) and the evaluation split (never flipped)."""
    builders = {"digits": _digits, "folder": _folder, "vtab": _vtab}
    return builders[spec.kind](spec, transform)


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


def _digits(spec: DataSpec, transform: ImageTransform) -> Splits:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    classes = spec.classes or tuple(range(10))
    keep = [i for i, y in enumerate(digits.target) if y in classes]
    relabel = {c: i for i, c in enumerate(classes)}
    images = torch.tensor(digits.data[keep], dtype=torch.float32)
    labels = torch.tensor([relabel[int(y)] for y in digits.target[keep]])
    train_idx, eval_idx = train_test_split(
        range(len(labels)), test_size=DIGITS_EVAL_FRACTION, stratify=labels.numpy(), random_state=0
    )
    x = _digits_tensor(images, transform)
    train_x, train_y = x[train_idx], labels[train_idx]
    train = _FlipDataset(train_x, train_y) if transform.hflip else TensorDataset(train_x, train_y)
    return Splits(train, TensorDataset(x[eval_idx], labels[eval_idx]), "val", [str(c) for c in classes])


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


def _eval_transform(transform: ImageTransform) -> ImageTransform:
    return ImageTransform(transform.size, transform.mean, transform.std, hflip=False)


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


def _folder(spec: DataSpec, transform: ImageTransform) -> Splits:
    root = spec.path
    train_dir = root / "train"
    eval_dir = next((root / s for s in ("val", "test") if (root / s).is_dir()), None)
    if not train_dir.is_dir() or eval_dir is None:
        raise DataError(f"{root}: expected train/ and val/ (or test/) sub-folders of class folders")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{train_dir}: no class folders")
    extra = sorted({p.name for p in eval_dir.iterdir() if p.is_dir()} - set(classes))
    if extra:
        raise DataError(f"{eval_dir / extra[0]}: class not present in {train_dir}")
    train = FileImages(_scan_split(train_dir, classes), transform.pil())
    evaluation = FileImages(_scan_split(eval_dir, classes), _eval_transform(transform).pil())
    return Splits(train, evaluation, eval_dir.name, classes)


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


def _vtab(spec: DataSpec, transform: ImageTransform) -> Splits:
    root = spec.path
    train = _read_list(root / "train800val200.txt", root)
    test = _read_list(root / "test.txt", root)
    num_classes = max(label for _, label in train + test) + 1
    if min(label for _, label in train + test) < 0:
        raise DataError(f"{root}: negative class label in the list files")
    return Splits(
        FileImages(train, transform.pil()),
        FileImages(test, _eval_transform(transform).pil()),
        "test",
        [str(i) for i in range(num_classes)],
    )
