"""Shared pieces of the exporters: the example input, the dynamic batch, and atomic placement."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

INPUT_NAME, OUTPUT_NAME = "input", "logits"
EXAMPLE_BATCH = 2  # >= 2, so that export does not specialise the batch dimension to 1
MAX_BATCH = 1024  # the bound torch.export is told; neither ONNX Runtime nor an AOTInductor package enforces it


def example_input(image_size: tuple[int, int], batch: int = EXAMPLE_BATCH) -> torch.Tensor:
    return torch.randn(batch, 3, *image_size)


def batch_dim() -> dict[int, torch.export.Dim]:
    """dynamic_shapes entry for the image input: a batch dimension declared as 1..MAX_BATCH."""
    return {0: torch.export.Dim("batch", min=1, max=MAX_BATCH)}


@contextmanager
def staged_files(final_dir: Path) -> Iterator[Path]:
    """A temp directory beside `final_dir`; on success its files are moved into `final_dir`, the file a
    reader opens (model.onnx after model.onnx.data, model.xml after model.bin) placed last, so an
    interrupted export never leaves a finished-looking artifact. On failure nothing is moved."""
    final_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final_dir, prefix=".export-"))
    try:
        yield tmp
        files = sorted(p for p in tmp.iterdir() if p.is_file())
        for f in sorted(files, key=lambda p: p.suffix in (".onnx", ".pt", ".pt2", ".plan", ".xml")):
            os.replace(f, final_dir / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
