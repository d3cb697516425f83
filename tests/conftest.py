"""Fixtures shared by the test modules (helpers live in tests/helpers.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from torch import nn

from helpers import QUIET, ROOT, TINY, TINY_RUN, make_vit

# The checkout under test is `vitfold` for this process (pytest runs from its root) and for every process
# a test starts (`python -m vitfold` in a temporary folder), whatever another editable install points at.
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])


FOLDER_MARKERS = {"e2e": "e2e", "faults": "faults"}  # tests/<folder>/ -> the marker its tests carry


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """End-to-end and fault tests live apart (tests/e2e/, tests/faults/) and carry their folder's marker,
    so `pytest -m "not e2e and not faults"` runs the unit tests alone."""
    for item in items:
        folder = Path(item.path).relative_to(ROOT / "tests").parts[0]
        if folder in FOLDER_MARKERS:
            item.add_marker(FOLDER_MARKERS[folder])


@pytest.fixture
def tiny_vit() -> nn.Module:
    name, kwargs = TINY
    return make_vit(name, **kwargs)


@pytest.fixture(scope="session")
def exported_run(tmp_path_factory) -> Path:
    """A tiny RLRR run trained one epoch, folded, and exported to onnx, torchscript and aoti (+ triton).
    Read-only for tests: copy it with `copy_run` before changing anything."""
    from vitfold.pipeline.config import load_config
    from vitfold.pipeline.stages import RunDir, run_stage

    rd = RunDir(tmp_path_factory.mktemp("run"))
    rd.write_config(load_config(None, **{k: v for k, v in TINY_RUN.items() if k != "train"}, train=TINY_RUN["train"]))
    run_stage("train", rd, **QUIET)
    run_stage("fold", rd, **QUIET)
    run_stage("export", rd, formats=["onnx", "torchscript", "aoti"], triton=str(rd.path / "triton"), **QUIET)
    return rd.path


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory) -> Path:
    """Every test (and every CLI it starts) uses a cache of its own: the pre-trained backbones and the
    store of artifacts this machine exported, so the user's ~/.cache/vitfold is neither read nor written."""
    import os

    cache = tmp_path_factory.mktemp("vitfold-cache")
    os.environ["VITFOLD_CACHE"] = str(cache)
    return cache
