"""Datasets (ImageFolder, VTAB-1k lists, digits) and local backbone checkpoints, with their errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from vitfold.errors import CheckpointError, DataError
from vitfold.pipeline.backbones import load_checkpoint
from vitfold.pipeline.data import ImageTransform, build_splits, parse_data_spec

from helpers import vitfold_cli

T = ImageTransform((16, 16), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def _image(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 12), (value, 255 - value, 7)).save(path)


def _folder(root: Path, classes=("cat", "dog"), splits=("train", "val"), per_class: int = 3) -> Path:
    for split in splits:
        for c, name in enumerate(classes):
            for i in range(per_class):
                _image(root / split / name / f"{i}.png", 40 * c + i)
    return root


def test_folder_dataset_reads_classes_and_normalises(tmp_path):
    splits = build_splits(parse_data_spec(f"folder:{_folder(tmp_path)}"), T)
    assert splits.class_names == ["cat", "dog"] and splits.eval_split == "val"
    x, y = splits.train[4]
    assert x.shape == (3, 16, 16) and y == 1
    expected_red = (40 * 1 + 1) / 255  # dog/1.png, red channel, normalised with mean = std = 0.5
    assert abs(float(x[0].mean()) - (expected_red - 0.5) / 0.5) < 0.02


def test_folder_uses_test_split_when_there_is_no_val(tmp_path):
    splits = build_splits(parse_data_spec(f"folder:{_folder(tmp_path, splits=('train', 'test'))}"), T)
    assert splits.eval_split == "test" and len(splits.eval) == 6


def test_empty_class_and_empty_split_are_input_errors(tmp_path):
    root = _folder(tmp_path / "a")
    (root / "train" / "empty").mkdir()
    with pytest.raises(DataError, match=r"class folder .*train/empty has no images"):
        build_splits(parse_data_spec(f"folder:{root}"), T)
    root = _folder(tmp_path / "b", splits=("train",))
    (root / "val" / "cat").mkdir(parents=True)  # an empty class folder in the validation split
    with pytest.raises(DataError, match=r"class folder .*val/cat has no images"):
        build_splits(parse_data_spec(f"folder:{root}"), T)
    (root / "val" / "cat").rmdir()  # a validation split with no class folder at all
    with pytest.raises(DataError, match=r"split .*val has no images"):
        build_splits(parse_data_spec(f"folder:{root}"), T)


def test_corrupt_image_is_named(tmp_path):
    root = _folder(tmp_path)
    bad = root / "train" / "cat" / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    splits = build_splits(parse_data_spec(f"folder:{root}"), T)
    index = [p for p, _ in splits.train.samples].index(bad)
    with pytest.raises(DataError, match=f"cannot read image {bad}"):
        splits.train[index]


@pytest.mark.parametrize("workers", ["0", "1"])
def test_corrupt_image_fails_train_with_one_line(tmp_path, workers):
    root = _folder(tmp_path, per_class=8)
    bad = root / "train" / "dog" / "0.png"
    bad.write_bytes(b"garbage")
    args = [
        "train",
        "--data",
        f"folder:{root}",
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--out",
        str(tmp_path / "r"),
        "--backbone",
        "vit_tiny_patch16_224",
        "--num-workers",
        workers,
    ]
    cfg = tmp_path / "c.yaml"
    cfg.write_text("backbone_kwargs: {img_size: 16, patch_size: 4, depth: 1}\n")
    result = vitfold_cli(*args, "--config", str(cfg))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"cannot read image {bad}" in lines[0], result.stderr


def test_vtab_lists(tmp_path):
    for i in range(4):
        _image(tmp_path / "images" / f"{i}.jpg", 50 * i)
    (tmp_path / "train800val200.txt").write_text("images/0.jpg 0\nimages/1.jpg 2\nimages/2.jpg 1\n")
    (tmp_path / "test.txt").write_text("images/3.jpg 1\n")
    splits = build_splits(parse_data_spec(f"vtab:{tmp_path}"), T)
    assert splits.num_classes == 3 and len(splits.train) == 3 and splits.eval_split == "test"
    assert splits.train[1][1] == 2
    (tmp_path / "test.txt").write_text("images/3.jpg\n")
    with pytest.raises(DataError, match=r"test.txt:1: expected 'relative/path label'"):
        build_splits(parse_data_spec(f"vtab:{tmp_path}"), T)
    (tmp_path / "test.txt").unlink()
    with pytest.raises(DataError, match="VTAB list file not found"):
        build_splits(parse_data_spec(f"vtab:{tmp_path}"), T)


def test_digits_subset_is_relabelled_and_stratified():
    splits = build_splits(parse_data_spec("digits:5-9"), T)
    assert splits.class_names == ["5", "6", "7", "8", "9"]
    labels = torch.stack([y for _, y in splits.eval])
    assert set(labels.tolist()) == set(range(5))
    from sklearn.datasets import load_digits as sklearn_digits

    reference = sklearn_digits()
    assert len(splits.train) + len(splits.eval) == int((reference.target >= 5).sum())
    assert abs(len(splits.eval) / (len(splits.train) + len(splits.eval)) - 0.25) < 0.01
    counts = torch.bincount(labels, minlength=5).tolist()  # stratified: each class gives about a quarter
    totals = [int((reference.target == c).sum()) for c in range(5, 10)]
    assert all(abs(n - 0.25 * t) <= 1 for n, t in zip(counts, totals, strict=True))


def test_shipped_digits_equal_scikit_learns():
    from sklearn.datasets import load_digits as sklearn_digits

    from vitfold.pipeline.data import load_digits

    images, labels = load_digits()
    reference = sklearn_digits()
    assert torch.equal(images, torch.tensor(reference.data, dtype=torch.float32))
    assert labels.tolist() == reference.target.tolist()


def _tiny(**kw):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=2, **kw)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_checkpoint_loads_backbone_and_ignores_other_head(tmp_path, suffix):
    source = _tiny(num_classes=7)
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file(source.state_dict(), path)
    else:
        torch.save({"state_dict": source.state_dict()}, path)
    target = _tiny(num_classes=3)
    torch.nn.init.zeros_(target.blocks[1].mlp.fc2.weight)
    load_checkpoint(target, path)
    assert torch.equal(target.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)
    assert torch.equal(target.pos_embed, source.pos_embed)


def test_mismatched_checkpoint_names_key_and_shapes(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(timm.create_model("vit_small_patch16_224", img_size=16, patch_size=4, depth=2).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"'cls_token' has shape \(1, 1, 384\), the backbone has \(1, 1, 192\)"):
        load_checkpoint(_tiny(), path)
    state = _tiny().state_dict()
    del state["blocks.1.norm2.bias"]
    save_file(state, path)
    with pytest.raises(CheckpointError, match="lacks 'blocks.1.norm2.bias'"):
        load_checkpoint(_tiny(), path)
