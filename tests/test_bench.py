"""The bench stage on a tiny trained, folded and exported run: files, rows, ratios, manifest, errors."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pytest
import torch

from vitfold.cli import parse_batch_sizes
from vitfold.errors import VitfoldError
from vitfold.pipeline.stages import run_stage
from vitfold.pipeline.stages.bench import ROW_KEYS

from helpers import copy_run

FAST = {"min_iters": 5, "min_seconds": 0.05, "warmup_seconds": 0.01}
BACKENDS = ["torch-folded", "torch-base", "torch-unmerged", "onnxruntime", "torchscript"]
BATCHES = [1, 2]


def bench(run: Path, backends: list[str], batch_sizes: list[int] | None = None, **kwargs) -> list[dict]:
    settings = {"backends": backends, **({"batch_sizes": batch_sizes} if batch_sizes else {}), **FAST, **kwargs}
    return run_stage("bench", run, **{"log": lambda _: None, **settings})


@pytest.fixture(scope="module")
def run(exported_run: Path, tmp_path_factory) -> Path:
    """A copy of the shared tiny run (conftest), which bench writes into."""
    return copy_run(exported_run, tmp_path_factory.mktemp("bench") / "run")


@pytest.fixture(scope="module")
def benched(run) -> tuple[Path, list[dict], list[str]]:
    lines: list[str] = []
    rows = bench(run, BACKENDS, BATCHES, threads=1, log=lines.append)
    return run, rows, lines


def test_writes_json_csv_and_png(benched):
    run, rows, _ = benched
    out = run / "bench"
    summary = json.loads((out / "bench.json").read_text())
    assert summary["rows"] == rows
    assert summary["threads"] == 1 and summary["device"] == "cpu" and summary["machine"]["cpu"]
    assert summary["image_size"] == [16, 16] and summary["skipped"] == {}
    with open(out / "bench.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == ROW_KEYS
        assert len(list(reader)) == len(rows)
    png = (out / "latency.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_rows_cover_every_backend_and_batch_with_sane_statistics(benched):
    _, rows, _ = benched
    assert {(r["backend"], r["batch_size"]) for r in rows} == {(b, n) for b in BACKENDS for n in BATCHES}
    for row in rows:
        assert tuple(row) == ROW_KEYS
        assert row["iterations"] >= 5
        assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
        assert row["throughput_ips"] > 0
        assert row["throughput_ips"] == pytest.approx(row["batch_size"] * 1000 / row["mean_ms"], rel=1e-3)
    providers = {r["backend"]: r["provider"] for r in rows}
    assert providers["onnxruntime"] == "CPUExecutionProvider" and providers["torch-folded"] == "cpu"
    assert {r["device"] for r in rows} == {"cpu"} and {r["precision"] for r in rows} == {"fp32"}


def test_ratios_are_recorded_and_logged_for_each_batch_size(benched):
    run, _, lines = benched
    ratios = json.loads((run / "bench" / "bench.json").read_text())["ratios"]
    for key in ("folded_vs_base", "unmerged_vs_folded"):
        assert set(ratios[key]) == {"1", "2"} and all(r > 0 for r in ratios[key].values())
        assert sum(line.startswith(key) for line in lines) == 1


def test_manifest_records_the_bench_outputs(benched):
    run, _, _ = benched
    stage = json.loads((run / "manifest.json").read_text())["stages"]["bench"]
    files = ["bench/bench.json", "bench/bench.csv", "bench/latency.png"]
    assert stage["outputs"] == {f: hashlib.sha256((run / f).read_bytes()).hexdigest() for f in files}
    assert {"fold/model.safetensors", "export/model.onnx", "export/model.pt"} <= set(stage["inputs"])
    assert stage["batch_sizes"] == list(BATCHES) and stage["device"] == "cpu"


def test_unbuilt_artifact_is_skipped_with_its_reason_and_a_lost_one_stops_the_bench(run, tmp_path):
    run = copy_run(run, tmp_path / "run", without=("bench",))
    (run / "export" / "model.pt2").unlink()
    with pytest.raises(VitfoldError, match="model.pt2 is missing, though the export stage recorded it"):
        bench(run, ["torch-base", "aoti"], [1])
    manifest = json.loads((run / "manifest.json").read_text())
    del manifest["stages"]["export"]["outputs"]["export/model.pt2"]  # now as if aoti was never exported
    (run / "manifest.json").write_text(json.dumps(manifest))
    lines: list[str] = []
    bench(run, ["torch-base", "aoti"], [1], threads=1, log=lines.append)
    summary = json.loads((run / "bench" / "bench.json").read_text())
    assert "export/model.pt2 not built" in summary["skipped"]["aoti"]
    assert [r["backend"] for r in summary["rows"]] == ["torch-base"]
    assert any(line.startswith("skipping aoti: ") for line in lines)
    with pytest.raises(VitfoldError, match="nothing to bench: aoti: export/model.pt2 not built"):
        bench(run, ["aoti"], [1])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"backends": ["openvino"]}, "unknown backend 'openvino'"),
        ({"batch_sizes": [1, 0]}, r"bench.batch_sizes must be a list of positive integers, got \[1, 0\]"),
        ({"batch_sizes": [2.5]}, r"bench.batch_sizes must be a list of positive integers, got \[2.5\]"),
        ({"threads": 0}, "bench.threads must be a positive integer, got 0"),
        ({"warmup_seconds": float("nan")}, "bench.warmup_seconds must be a number >= 0"),
    ],
)
def test_bad_options_are_one_line_errors(run, kwargs, message):
    with pytest.raises(VitfoldError, match=message) as error:
        bench(run, **{"backends": ["torch-base"], **kwargs})
    assert "\n" not in str(error.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_an_error(run):
    with pytest.raises(VitfoldError, match="device 'cuda': no CUDA GPU visible"):
        bench(run, ["torch-base"], device="cuda")


def test_missing_run_dir_is_an_error(tmp_path):
    with pytest.raises(VitfoldError, match="is not a run directory"):
        bench(tmp_path / "nothing", ["torch-base"])


def test_parse_batch_sizes():
    assert parse_batch_sizes("1, 8,32") == [1, 8, 32]
    for text, bad in [("1,x", "'x'"), ("0", "'0'"), ("-4", "'-4'"), ("", "no batch size")]:
        with pytest.raises(VitfoldError, match=f"--batch-sizes: .*{bad}"):
            parse_batch_sizes(text)
