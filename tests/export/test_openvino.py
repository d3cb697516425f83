"""OpenVINO artifacts: the fp32 IR computes what the folded model computes, the bf16 IR runs in bf16
within its gate, the INT8 IR (NNCF) is judged by the int8 gate on the evaluation split, the IR carries the
preprocessing and class names, Triton serves it with its OpenVINO backend, a missing package is one line
and exit 2, and the bench records every runtime's thread and spin settings."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

import vitfold.pipeline.stages.export as export_stage
from vitfold.cli import main
from vitfold.errors import VitfoldError
from vitfold.export import export, open_runner, roofline
from vitfold.export.isa import cpu_has_bf16
from vitfold.export.model_info import ModelInfo
from vitfold.export.triton import write_triton_repository
from vitfold.pipeline.config import load_config
from vitfold.pipeline.stages import RunDir, run_stage

from helpers import CALIBRATION_SAMPLES, QUIET, TINY, TINY_RUN, copy_run, images, make_vit, vitfold_cli

pytest.importorskip("openvino", reason="the [openvino] extra is not installed")
ov = pytest.importorskip("openvino")

# a tiny run whose predictions have margins (as test_precisions' CONFIDENT_RUN): int8 can only pass on one
CONFIDENT_RUN = {**TINY_RUN, "method": "full", "train": {**TINY_RUN["train"], "epochs": 6, "lr": 1e-3}}
INFO = ModelInfo(
    {"input_size": [3, 32, 32], "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.25] * 3, "crop_pct": 0.9,
     "crop_mode": "center"},
    tuple(f"class {i}" for i in range(1000)),
)  # fmt: skip


def _max_rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|, computed here apart from vitfold.export.comparison."""
    return float((out.double() - ref.double()).abs().max() / ref.double().abs().max())


@pytest.fixture(scope="module")
def tiny_irs(tmp_path_factory) -> tuple[torch.nn.Module, dict[str, Path]]:
    """A tiny ViT (random weights, its head too) exported to ONNX and the fp32 and bf16 IRs."""
    name, kwargs = TINY
    model = make_vit(name, **kwargs)
    out = tmp_path_factory.mktemp("ov")
    precision = "bf16" if cpu_has_bf16() else "fp32"
    return model, export(model, out, ["openvino"], (3, 32, 32), precision, info=INFO)


def test_fp32_ir_computes_the_folded_model_at_fp32_noise(tiny_irs):
    model, files = tiny_irs
    assert files["openvino"].name == "model.xml" and files["openvino"].with_suffix(".bin").is_file()
    for batch in (1, 3):
        x = images(model, batch)
        with torch.no_grad():
            reference = model(x)
        with open_runner("openvino", files["openvino"], threads=1) as runner:
            out = runner(runner.to_device(x))
            assert runner.settings["precision_hint"] == "f32"  # explicit: OpenVINO's default here may be bf16
            assert runner.settings["threads"] == 1 and runner.settings["performance_hint"] == "LATENCY"
        assert out.shape == reference.shape and out.dtype == torch.float32
        assert _max_rel(out, reference) <= 1e-5


def test_int8_irs_float_ops_run_bf16_only_on_a_cpu_with_amx():
    from vitfold.export.openvino_runner import float_ops_hint

    assert [float_ops_hint(p, amx=True) for p in ("fp32", "bf16", "int8")] == ["f32", "bf16", "bf16"]
    assert [float_ops_hint(p, amx=False) for p in ("fp32", "bf16", "int8")] == ["f32", "bf16", "f32"]


def test_one_runner_serves_every_batch_size_compiled_for_each_shape(tiny_irs):
    """The runner compiles the IR per input shape (static shapes run faster): a batch size seen before, one
    dropped from its cache and one it has not seen all give the folded model's logits."""
    from vitfold.export.openvino_runner import STATIC_SHAPES_KEPT

    model, files = tiny_irs
    batches = [1, 3, 1, *range(4, 4 + STATIC_SHAPES_KEPT), 1]  # batch 1 is dropped, then compiled again
    with open_runner("openvino", files["openvino"], threads=1) as runner:
        for batch in batches:
            x = images(model, batch)
            with torch.no_grad():
                reference = model(x)
            assert _max_rel(runner(x), reference) <= 1e-5, batch
        assert list(runner.requests) == [(b, 3, 32, 32) for b in batches[-STATIC_SHAPES_KEPT:]]
        with pytest.raises(VitfoldError, match=r"model\.xml: does not take input shape \[2, 3, 16, 16\]"):
            runner(images(model, 2)[..., :16, :16])


@pytest.mark.skipif(not cpu_has_bf16(), reason="the CPU has no native BF16 (AVX512_BF16 or AMX)")
def test_bf16_ir_computes_in_bf16_within_the_bf16_gate(tiny_irs):
    model, files = tiny_irs
    x = images(model, 4)
    with torch.no_grad():
        reference = model(x)
    with open_runner("openvino", files["openvino-bf16"], threads=1) as runner:
        out = runner(x)
        assert runner.settings["precision_hint"] == "bf16"
    cosine = torch.nn.functional.cosine_similarity(out.double(), reference.double(), dim=-1).min()
    assert 1e-4 < _max_rel(out, reference) <= 8e-2  # bf16 rounding shows: it really ran in bf16
    assert float(cosine) >= 0.995


def test_every_ir_carries_the_preprocessing_class_names_and_its_precision(tiny_irs):
    _, files = tiny_irs
    for artifact, path in files.items():
        if not artifact.startswith("openvino"):
            continue
        model = ov.Core().read_model(str(path))
        read = {key: model.get_rt_info(["model_info", key]).astype(str) for key in INFO.metadata_props()}
        assert {k: json.loads(v) for k, v in read.items()} == {
            **INFO.preprocessing,
            "class_names": list(INFO.class_names),
        }
        precision = artifact.split("-")[1] if "-" in artifact else "fp32"
        assert model.get_rt_info(["vitfold", "precision"]).astype(str) == precision
        hint = model.get_rt_info(["runtime_options", "INFERENCE_PRECISION_HINT"]).astype(str)
        assert hint == {"fp32": "f32", "bf16": "bf16"}[precision]


@pytest.fixture(scope="module")
def ov_run(tmp_path_factory) -> Path:
    """CONFIDENT_RUN trained, folded and exported to ONNX and OpenVINO with the INT8 of both beside them."""
    rd = RunDir(tmp_path_factory.mktemp("ovrun") / "run")
    train = CONFIDENT_RUN["train"]
    rd.write_config(load_config(None, **{k: v for k, v in CONFIDENT_RUN.items() if k != "train"}, train=train))
    for stage in ("train", "fold"):
        run_stage(stage, rd, **QUIET)
    run_stage("export", rd, formats=["onnx", "openvino"], precision="int8", **QUIET)
    return rd.path


def _split(run: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The evaluation split's images and labels, and the folded model's predictions (timm alone)."""
    import timm
    from safetensors.torch import load_file

    from vitfold.pipeline.data import build_splits, parse_data_spec
    from vitfold.pipeline.models import data_transform

    model = timm.create_model(CONFIDENT_RUN["backbone"], num_classes=5, **CONFIDENT_RUN["backbone_kwargs"])
    model.load_state_dict(load_file(run / "fold" / "model.safetensors"))
    rd = RunDir(run)
    split = build_splits(parse_data_spec(rd.config.data), data_transform(rd.config, model.eval())).eval
    x = torch.stack([split[i][0] for i in range(len(split))])
    labels = torch.tensor([int(split[i][1]) for i in range(len(split))])
    with torch.no_grad():
        return x, labels, model(x).argmax(-1)


def test_int8_ir_is_nncf_quantized_and_judged_by_the_int8_gate_on_the_whole_split(ov_run, tmp_path):
    run = copy_run(ov_run, tmp_path / "run")
    summary = json.loads((run / "export" / "export.json").read_text())
    assert summary["int8"]["calibration"] == {"split": "train", "images": CALIBRATION_SAMPLES, "seed": 0}
    assert summary["int8"]["openvino"] == {
        "quantizer": "nncf",
        "model_type": "transformer",
        "preset": "mixed",
        "subset_size": CALIBRATION_SAMPLES,
        "fast_bias_correction": True,
    }
    model = ov.Core().read_model(str(run / "export" / "model.int8.xml"))
    ops = [op.get_type_name() for op in model.get_ordered_ops()]
    assert ops.count("FakeQuantize") >= 2 * 4  # the block's weights and activations, not a float copy
    result = run_stage("verify", run, backends=["openvino", "openvino-int8"], **QUIET)
    x, labels, reference = _split(run)
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    predicted = torch.from_numpy(compiled(x.numpy())[0]).argmax(-1)
    agreement = float((predicted == reference).double().mean())
    delta = 100 * float((predicted == labels).double().mean() - (reference == labels).double().mean())
    rows = {(r["backend"], r["batch_size"]): r for r in result["results"]}
    assert float((reference == labels).double().mean()) > 0.6  # the fixture's model has margins
    for b in (1, 8):
        row = rows["openvino-int8", b]
        assert row["precision"] == "int8" and row["split_top1_agreement"] == pytest.approx(agreement)
        assert row["accuracy_delta"] == pytest.approx(delta)
        assert row["passed"] is (agreement >= 0.99 and delta >= -0.5) is True
        assert rows["openvino", b]["precision"] == "fp32" and rows["openvino", b]["max_rel"] <= 1e-4
    assert result["passed"]


def test_an_int8_ir_calibrated_on_nothing_fails_verify_with_exit_1(ov_run, tmp_path, monkeypatch):
    run = copy_run(ov_run, tmp_path / "run")
    real = export_stage.calibration_images
    monkeypatch.setattr(export_stage, "calibration_images", lambda *a, **k: torch.zeros_like(real(*a, **k)))
    run_stage("export", run, formats=["openvino"], precision="int8", **QUIET)
    done = vitfold_cli("verify", str(run), "--backends", "openvino-int8")
    assert done.returncode == 1, done.stdout + done.stderr
    rows = json.loads((run / "verify" / "verify.json").read_text())["results"]
    assert not any(r["passed"] for r in rows if r["backend"] == "openvino-int8")


def test_a_changed_ir_weights_file_stops_verify_with_exit_2(ov_run, tmp_path):
    run = copy_run(ov_run, tmp_path / "run")
    weights = run / "export" / "model.bin"
    data = bytearray(weights.read_bytes())
    data[-4:] = bytes(4)  # the last weight of the head
    weights.write_bytes(bytes(data))
    done = vitfold_cli("verify", str(run), "--backends", "openvino")
    assert done.returncode == 2 and "model.bin does not match the sha256" in done.stderr + done.stdout


@pytest.mark.parametrize(("hidden", "precision"), [("openvino", "fp32"), ("nncf", "int8")])
def test_a_missing_package_is_one_line_and_exit_2(exported_run, tmp_path, monkeypatch, hidden, precision):
    run = copy_run(exported_run, tmp_path / "run")
    monkeypatch.setitem(sys.modules, hidden, None)  # `import openvino` now raises ImportError
    args = ["export", str(run), "--format", "openvino", "--precision", precision]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert f"needs the {hidden} package: pip install 'vitfold[openvino]'" in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not (run / "export" / "model.xml").exists()


def test_triton_serves_each_ir_with_the_openvino_backend(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    artifacts = {}
    for artifact, stem in [("openvino", "model"), ("openvino-bf16", "model.bf16"), ("openvino-int8", "model.int8")]:
        (src / f"{stem}.xml").write_text(f"<xml {artifact}/>")
        (src / f"{stem}.bin").write_bytes(artifact.encode())
        artifacts[artifact] = src / f"{stem}.xml"
    repo = tmp_path / "repo"
    configs = write_triton_repository(
        repo, artifacts, model_name="vit", input_name="input", output_name="logits", image_shape=(3, 16, 16),
        num_classes=5, max_batch_size=8, labels="a\nb\nc\nd\ne\n",
    )  # fmt: skip
    parsed = {c.parent.name: text_format.Parse(c.read_text(), model_config_pb2.ModelConfig()) for c in configs}
    assert sorted(parsed) == ["vit_openvino", "vit_openvino_bf16", "vit_openvino_int8"]
    for name, config in parsed.items():
        assert config.backend == "openvino" and not config.platform and config.max_batch_size == 8
        assert [g.kind for g in config.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_CPU]
        parameters = {k: v.string_value for k, v in config.parameters.items()}
        bf16 = {"HINT_BF16": "YES"} if name.endswith("bf16") else {}
        assert parameters == {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1", **bf16}
        artifact = name.removeprefix("vit_").replace("_", "-")
        version = repo / name / "1"
        assert (version / "model.xml").read_text() == f"<xml {artifact}/>"
        assert (version / "model.bin").read_bytes() == artifact.encode()  # the IR's own weights, renamed
        assert config.output[0].label_filename == "labels.txt"


def test_bench_times_openvino_and_records_every_runtimes_thread_and_spin_settings(ov_run, tmp_path, monkeypatch):
    run = copy_run(ov_run, tmp_path / "run")
    monkeypatch.setattr(roofline, "MATMUL_SIZES", (256, 512))  # the peaks' matmuls, small: the test's time
    fast = {"min_iters": 4, "min_seconds": 0.02, "warmup_seconds": 0.01, "rounds": 2}
    backends = ["torch-unmerged", "onnxruntime", "openvino", "openvino-int8"]
    run_stage("bench", run, backends=backends, batch_sizes=[1, 2], threads=1, roofline=True, **fast, **QUIET)
    bench = json.loads((run / "bench" / "bench.json").read_text())
    assert bench["spin"] is False and bench["timing"]["round_warmup"] == 1 and bench["timing"]["gc_paused"] is True
    runtimes = bench["runtimes"]
    assert runtimes["onnxruntime"]["allow_spinning"] is False and runtimes["onnxruntime"]["intra_op_num_threads"] == 1
    amx = "amx_bf16" in Path("/proc/cpuinfo").read_text()  # the INT8 IR's float ops run bf16 on AMX only
    assert runtimes["openvino"]["threads"] == 1 and runtimes["openvino-int8"]["precision_hint"] == (
        "bf16" if amx else "f32"
    )
    assert runtimes["torch-unmerged"]["threads"] == 1 and "OMP_WAIT_POLICY" in runtimes["torch-unmerged"]
    # roofline: the forward's FLOPs written out here (2 per multiply-add; tokens 16 + cls, d 192, mlp 768)
    tokens, d, patches = 17, 192, 16
    block = 2 * tokens * d * (3 * d + d + 2 * 4 * d) + 2 * 2 * tokens * tokens * d
    flops = 2 * patches * (3 * 4 * 4) * d + 2 * block + 2 * d * 5
    assert bench["roofline"]["gflop_per_image"] == pytest.approx(flops / 1e9, rel=1e-3)
    peaks = bench["roofline"]["peak_gflop_per_s"]
    assert set(peaks) >= {"fp32", "int8"} and min(peaks.values()) > 0
    # each peak names the matmul that set it, of its own precision; OpenVINO's are among the candidates
    assert all(f" {p} n=" in by for p, by in bench["roofline"]["peak_by"].items())
    assert {"matmul openvino int8 n=256", "matmul openvino fp32 n=512"} <= set(roofline.peak_variants(1, bf16=False))
    for row in bench["rows"]:
        achieved = row["batch_size"] * flops / 1e9 / (row["p50_ms"] / 1e3)
        assert row["gflop_per_s"] == pytest.approx(achieved, rel=1e-2)
        assert row["of_peak"] == pytest.approx(achieved / peaks[row["precision"]], rel=2e-2)
    precisions = {(r["backend"], r["batch_size"]): r["precision"] for r in bench["rows"]}
    assert precisions["openvino-int8", 1] == "int8" and precisions["openvino", 2] == "fp32"
    run_stage("report", run, **QUIET)
    report = (run / "REPORT.md").read_text()
    for precision, by in bench["roofline"]["peak_by"].items():  # each peak, with the matmul that set it
        assert f"{precision} {peaks[precision]:,.1f} by {by.removeprefix('matmul ')}" in report
    for row in bench["rows"]:  # each row's speed-ups, from bench.json's p50s, in the report's latency table
        base = next(
            r for r in bench["rows"] if r["backend"] == "torch-unmerged" and r["batch_size"] == row["batch_size"]
        )
        line = next(
            x
            for x in report.splitlines()
            if x.startswith(f"| {row['backend']} |") and f" | {row['batch_size']} | " in x
        )
        assert f"| {base['p50_ms'] / row['p50_ms']:.2f}× |" in line


def test_onnxruntime_spin_setting_reaches_the_session(exported_run):
    onnx = exported_run / "export" / "model.onnx"
    for spin, expected in ((False, "0"), (True, "1")):
        with open_runner("onnxruntime", onnx, threads=1, spin=spin) as runner:
            options = runner.session.get_session_options()
            assert options.get_session_config_entry("session.intra_op.allow_spinning") == expected
            assert runner.settings["allow_spinning"] is spin
