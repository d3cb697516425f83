"""The FGVC protocol of the official RLRR code: `fgvc:PATH` in the layouts the official RLRR loaders read, the
official transform (resize 256/224 of the input, random crop + flip in training, centre crop in
evaluation) against one written out here with PIL, the `rlrr-fgvc:<dataset>` recipes against RLRR's
Table 2 settings, and a run on a generated CUB folder that trains, folds, exports and verifies."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vitfold.errors import DataError
from vitfold.pipeline.config import load_config
from vitfold.pipeline.data import ImageTransform, build_splits, parse_data_spec
from vitfold.pipeline.stages import RunDir, run_stage

from helpers import QUIET, TINY_RUN, write_fgvc

LAYOUTS = {  # official folder -> where the json paths point under it
    "CUB_200_2011": "images",
    "NABirds": "images",
    "OxfordFlowers": "",
    "StanfordCars": "",
    "StanfordDogs": "",
}
SIZES = {"train": 6, "val": 3, "test": 4}
CROP = ImageTransform((16, 16), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), hflip=False, crop=True)


def _tensor(image: Image.Image) -> torch.Tensor:
    return (torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 255 - 0.5) / 0.5


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_official_layout_loads_with_renumbered_classes(tmp_path, name):
    root = write_fgvc(tmp_path, name, SIZES)
    splits = build_splits(parse_data_spec(f"fgvc:{root}"), CROP)
    assert (splits.train_split, len(splits.train), len(splits.eval)) == ("trainval", 9, 4)
    assert splits.class_names == ["10", "20", "30"] and splits.select is None
    entries = json.loads((root / "trainval.json").read_text())
    for (path, label), (relative, class_id) in zip(splits.train.samples, entries.items(), strict=True):
        assert path == root / LAYOUTS[name] / relative and label == class_id // 10 - 1
    held_out = build_splits(parse_data_spec(f"fgvc:{root}"), CROP, validation=True)
    assert (held_out.train_split, len(held_out.train), held_out.select_split, len(held_out.select)) == (
        "train",
        6,
        "val",
        3,
    )


def test_fgvc_folder_errors_name_the_problem(tmp_path):
    other = tmp_path / "birds"
    other.mkdir()
    with pytest.raises(DataError, match=r"must be named as the official loaders name it .*got 'birds'"):
        parse_data_spec(f"fgvc:{other}")
    root = write_fgvc(tmp_path, "StanfordDogs", SIZES)
    (root / "test.json").write_text(json.dumps({"000.class/missing.jpg": 10}))
    with pytest.raises(DataError, match=r"test.json: image not found: .*missing.jpg"):
        build_splits(parse_data_spec(f"fgvc:{root}"), CROP)


def test_official_fgvc_transform(tmp_path):
    """get_transforms: Resize((256, 256)) (bilinear), RandomCrop(224) + flip in training, CenterCrop(224) in
    evaluation; scaled to a 16-pixel model: resize to 18, crop 16."""
    root = write_fgvc(tmp_path, "OxfordFlowers", SIZES)
    path = root / "000.class" / "test_0.jpg"
    Image.effect_noise((30, 22), 60).convert("RGB").save(path)  # texture, so that every crop differs
    splits = build_splits(parse_data_spec(f"fgvc:{root}"), CROP)
    resized = Image.open(path).convert("RGB").resize((18, 18), Image.BILINEAR)
    index = [p for p, _ in splits.eval.samples].index(path)
    torch.testing.assert_close(splits.eval[index][0], _tensor(resized.crop((1, 1, 17, 17))), rtol=0, atol=1e-6)
    crops = [_tensor(resized.crop((i, j, i + 16, j + 16))) for i in range(3) for j in range(3)]
    flipped = ImageTransform((16, 16), (0.5,) * 3, (0.5,) * 3, hflip=True, crop=True).pil(train=True)
    seen = set()
    for seed in range(40):
        torch.manual_seed(seed)
        x = flipped(Image.open(path).convert("RGB"))
        matches = [k for k, c in enumerate(crops) if torch.allclose(x, c, atol=1e-6)]
        flips = [k for k, c in enumerate(crops) if torch.allclose(x, c.flip(-1), atol=1e-6)]
        assert len(matches + flips) == 1, "not one of the 9 crops of the resized image, flipped or not"
        seen.add((tuple(matches), tuple(flips)))
    assert len(seen) > 5  # random offsets and flips


@pytest.mark.parametrize(
    ("dataset", "lr", "drop_path", "schedule"),
    [
        ("cub", 3e-3, 0.1, "warm-restarts"),
        ("nabirds", 5e-4, 0.3, "epoch-cosine"),
        ("flowers", 3e-3, 0.2, "epoch-cosine"),
        ("cars", 3e-3, 0.2, "epoch-cosine"),
        ("dogs", 1e-4, 0.0, "warm-restarts"),
    ],
)
def test_rlrr_fgvc_recipes_are_table_2s(dataset, lr, drop_path, schedule):
    t = load_config(None, recipe=f"rlrr-fgvc:{dataset}").train
    assert (t.lr, t.drop_path, t.weight_decay, t.schedule) == (lr, drop_path, 5e-2, schedule)
    assert (t.batch_size, t.total_epochs, t.hflip, t.drop_last, t.drop_path_mode) == (
        32,
        60,
        True,
        False,
        "official",
    )
    assert (
        (t.restart_epochs, t.warmup_epochs, t.min_lr) == (5, 0, 0.0) if schedule == "warm-restarts" else t.epochs == 50
    )


def test_fgvc_run_on_a_cub_folder_trains_folds_exports_and_verifies(tmp_path):
    root = write_fgvc(tmp_path / "data", "CUB_200_2011", {"train": 12, "val": 3, "test": 6})
    model = {k: v for k, v in TINY_RUN.items() if k not in ("train", "data")}
    cfg = load_config(None, data=f"fgvc:{root}", train={**TINY_RUN["train"], "batch_size": 8, "hflip": True}, **model)
    rd = RunDir(tmp_path / "run")
    rd.write_config(cfg)
    result = run_stage("train", rd, **QUIET)
    assert result["selected"]["epoch"] == 1 and rd.num_classes == 3
    run_stage("fold", rd, **QUIET)
    run_stage("export", rd, formats=["torchscript"], **QUIET)
    verified = run_stage("verify", rd, samples=4, **QUIET)
    assert verified["passed"]
    assert {r["backend"] for r in verified["results"]} == {"torch-folded", "torchscript"}
