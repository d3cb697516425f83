"""The bench stage on a tiny trained, folded and exported run: files, rows, ratios, manifest, errors; its
statistics (rounds, spread, the unstable flag) on injected numbers; and a bench under bursty CPU load."""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from vitfold.cli import parse_batch_sizes
from vitfold.errors import VitfoldError
from vitfold.export.isa import inductor_vec_isa
from vitfold.pipeline.stages import run_stage
from vitfold.pipeline.stages.bench import ROW_KEYS, bench_ratios, ratio_line

from helpers import copy_run

FAST = {
    "min_iters": 5,
    "min_seconds": 0.05,
    "warmup_seconds": 0.01,
    "rounds": 5,
    "roofline": False,
}  # peaks: test_openvino
BACKENDS = ["torch-folded", "torch-base", "torch-unmerged", "onnxruntime", "torchscript", "aoti"]
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
    assert summary["machine"]["inductor_vec_isa"] == str(torch._inductor.cpu_vec_isa.pick_vec_isa())
    compiled = summary["machine"]["aoti_compiled_isa"]["aoti"]  # exported on this machine: what inductor picks
    assert compiled.lower() == inductor_vec_isa().lower()
    assert summary["image_size"] == [16, 16] and summary["skipped"] == {}
    with open(out / "bench.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == ROW_KEYS
        written = list(reader)
    assert len(written) == len(rows)
    for line, row in zip(written, rows, strict=True):
        assert line["p99_ms"] == ("" if row["p99_ms"] is None else str(row["p99_ms"]))
        assert line["unstable"] == str(row["unstable"]) and float(line["rel_iqr"]) == row["rel_iqr"]
    png = (out / "latency.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_rows_cover_every_backend_and_batch_with_sane_statistics(benched):
    _, rows, _ = benched
    assert {(r["backend"], r["batch_size"]) for r in rows} == {(b, n) for b in BACKENDS for n in BATCHES}
    for row in rows:
        assert tuple(row) == ROW_KEYS
        assert row["iterations"] >= 5 and row["rounds"] == FAST["rounds"]
        assert 0 < row["p50_ms"] <= row["p90_ms"]
        if row["iterations"] < 100:
            assert row["p99_ms"] is None
        else:
            assert row["p90_ms"] <= row["p99_ms"]
        assert row["rel_iqr"] >= 0 and isinstance(row["unstable"], bool)
        assert row["throughput_ips"] > 0
        assert row["throughput_ips"] == pytest.approx(row["batch_size"] * 1000 / row["mean_ms"], rel=1e-3)
    providers = {r["backend"]: r["provider"] for r in rows}
    assert providers["onnxruntime"] == "CPUExecutionProvider" and providers["torch-folded"] == "cpu"
    assert {r["device"] for r in rows} == {"cpu"} and {r["precision"] for r in rows} == {"fp32"}


def test_ratios_are_recorded_and_logged_for_each_batch_size(benched):
    run, rows, lines = benched
    ratios = json.loads((run / "bench" / "bench.json").read_text())["ratios"]
    by_key = {(r["backend"], r["batch_size"]): r for r in rows}
    for key, (num, den) in {"folded_vs_base": BACKENDS[:2], "unmerged_vs_folded": BACKENDS[2::-2]}.items():
        assert (ratios[key]["numerator"], ratios[key]["denominator"]) == (num, den)
        assert set(ratios[key]["batches"]) == {"1", "2"}
        for b, ratio in ratios[key]["batches"].items():
            top, bottom = by_key[num, int(b)], by_key[den, int(b)]
            assert ratio["ratio"] == pytest.approx(top["p50_ms"] / bottom["p50_ms"], abs=1e-3)
            assert ratio["reliable"] == (not top["unstable"] and not bottom["unstable"])
            assert 0 < ratio["round_iqr"][0] <= ratio["round_iqr"][1]
        assert sum(line.startswith(key) for line in lines) == 1


def test_manifest_records_the_bench_outputs(benched):
    run, _, _ = benched
    stage = json.loads((run / "manifest.json").read_text())["stages"]["bench"]
    files = ["bench/bench.json", "bench/bench.csv", "bench/latency.png"]
    assert stage["outputs"] == {f: hashlib.sha256((run / f).read_bytes()).hexdigest() for f in files}
    assert {"fold/model.safetensors", "export/model.onnx", "export/model.pt"} <= set(stage["inputs"])
    assert stage["batch_sizes"] == list(BATCHES) and stage["device"] == "cpu"


# Busy for the first 50 ms of every 100 ms of the wall clock, asleep for the rest (all load processes in
# step), until the given number of seconds has passed.
BURSTS = """
import sys, time
end = time.time() + float(sys.argv[1])
while time.time() < end:
    if time.time() % 0.1 >= 0.05:
        time.sleep(0.1 - time.time() % 0.1)
"""
LOAD_PROCESSES = 4  # with the bench: five runnable processes on this machine's two cores during a burst


def test_a_bench_under_bursty_load_flags_unstable_rows_and_unreliable_ratios(run, tmp_path):
    run = copy_run(run, tmp_path / "run", without=("bench",))
    load = [subprocess.Popen([sys.executable, "-c", BURSTS, "60"]) for _ in range(LOAD_PROCESSES)]
    try:
        time.sleep(0.3)  # the load processes are running
        # 20 rounds of 20 ms per backend: each round falls mostly in a burst or mostly between two
        timing = {"min_iters": 20, "min_seconds": 0.4, "warmup_seconds": 0.01, "rounds": 20}
        bench(run, ["torch-folded", "torch-base"], [1], threads=1, unstable_above=0.1, **timing)
    finally:
        for process in load:
            process.kill()
            process.wait()
    summary = json.loads((run / "bench" / "bench.json").read_text())
    flagged = [r["backend"] for r in summary["rows"] if r["unstable"]]
    assert flagged, summary["rows"]
    ratio = summary["ratios"]["folded_vs_base"]["batches"]["1"]
    assert ratio["reliable"] is False and ratio["unstable"] == flagged
    run_stage("report", run, log=lambda _: None)
    report = (run / "REPORT.md").read_text()
    line = next(line for line in report.splitlines() if line.startswith("- folded_vs_base"))
    assert "b1 unreliable" in line and "the folded model is the base architecture" not in line
    assert report.count("**unstable**") == len(flagged)


def test_the_report_asks_for_a_new_bench_over_a_bench_json_without_stability_flags(benched, tmp_path):
    run = copy_run(benched[0], tmp_path / "run")
    summary = json.loads((run / "bench" / "bench.json").read_text())
    new = ("rounds", "rel_iqr", "unstable")
    summary["rows"] = [{k: v for k, v in row.items() if k not in new} for row in summary["rows"]]
    (run / "bench" / "bench.json").write_text(json.dumps(summary))
    run_stage("report", run, log=lambda _: None)
    assert "predates interleaved rounds and stability flags: rerun `vitfold bench`" in (run / "REPORT.md").read_text()


def _row(backend: str, p50: float, unstable: bool) -> dict:
    return {"backend": backend, "batch_size": 1, "p50_ms": p50, "unstable": unstable}


@pytest.mark.parametrize("unstable", [(), ("torch-base",), ("torch-folded", "torch-base")])
def test_a_ratio_carries_its_round_spread_and_is_unreliable_from_an_unstable_row(unstable):
    folded, base = np.array([1.0, 1.1, 0.9, 1.2, 1.0]), np.array([1.0, 1.0, 1.0, 1.0, 2.0])
    rows = [_row("torch-folded", 1.05, "torch-folded" in unstable), _row("torch-base", 1.0, "torch-base" in unstable)]
    ratio = bench_ratios(rows, {("torch-folded", 1): folded, ("torch-base", 1): base})["folded_vs_base"]
    found = ratio["batches"]["1"]
    assert found["ratio"] == pytest.approx(1.05)
    assert found["round_iqr"] == pytest.approx(np.percentile(folded / base, [25, 75]), abs=1e-3)
    assert found["reliable"] is (not unstable) and found["unstable"] == list(unstable)
    line = ratio_line("folded_vs_base", ratio)
    assert ("~1.0: the folded model is the base architecture" in line) is (not unstable)
    assert ("unreliable" in line) is bool(unstable)


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
        ({"backends": ["tvm"]}, "unknown backend 'tvm'"),
        ({"spin": "yes"}, "bench.spin must be true or false, got 'yes'"),
        ({"roofline": 1}, "bench.roofline must be true or false, got 1"),
        ({"batch_sizes": [1, 0]}, r"bench.batch_sizes must be a list of positive integers, got \[1, 0\]"),
        ({"batch_sizes": [2.5]}, r"bench.batch_sizes must be a list of positive integers, got \[2.5\]"),
        ({"threads": 0}, "bench.threads must be a positive integer, got 0"),
        ({"warmup_seconds": float("nan")}, "bench.warmup_seconds must be a number >= 0"),
        ({"rounds": 0}, "bench.rounds must be a positive integer, got 0"),
        ({"unstable_above": 0}, "bench.unstable_above must be a positive number, got 0"),
        ({"unstable_above": "high"}, "bench.unstable_above must be a positive number, got 'high'"),
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
