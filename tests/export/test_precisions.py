"""Artifacts at the precisions people ship, each behind the gate of its precision: INT8 ONNX
(QDQ, calibrated), BF16 AOTInductor on CPUs with native BF16, FP16/BF16 on CUDA; tolerances per precision."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import vitfold.export.int8 as int8_module
import vitfold.pipeline.stages.export as export_stage
from vitfold.errors import VitfoldError
from vitfold.export.comparison import DEFAULT_TOLERANCES, Tolerance, split_stats, tolerances_for
from vitfold.export.exporting import check_formats
from vitfold.export.isa import cpu_has_bf16
from vitfold.pipeline.config import load_config
from vitfold.pipeline.stages import RunDir, run_stage

from helpers import CALIBRATION_SAMPLES, QUIET, TINY_RUN, copy_run, rel, vitfold_cli

# a tiny run whose predictions have margins (full fine-tuning, ~86% on digits 0-4): on a near-chance
# model, any quantization flips near-ties and no int8 artifact could pass
CONFIDENT_RUN = {
    **TINY_RUN,
    "data": "digits:0-4",
    "method": "full",
    "train": {**TINY_RUN["train"], "epochs": 6, "lr": 1e-3},
    "export": {"calibration_samples": 200},  # fewer than the 225 evaluation images, as in TINY_RUN
}


@pytest.fixture(scope="module")
def int8_run(tmp_path_factory) -> Path:
    """CONFIDENT_RUN trained, folded and exported to ONNX with its INT8 version beside it."""
    rd = RunDir(tmp_path_factory.mktemp("int8") / "run")
    train = CONFIDENT_RUN["train"]
    rd.write_config(load_config(None, **{k: v for k, v in CONFIDENT_RUN.items() if k != "train"}, train=train))
    for stage in ("train", "fold"):
        run_stage(stage, rd, **QUIET)
    run_stage("export", rd, formats=["onnx"], precision="int8", **QUIET)
    return rd.path


def _folded_timm(run: Path) -> torch.nn.Module:
    """The folded model loaded with timm and safetensors alone (not through vitfold)."""
    import timm
    from safetensors.torch import load_file

    model = timm.create_model(CONFIDENT_RUN["backbone"], num_classes=5, **CONFIDENT_RUN["backbone_kwargs"])
    model.load_state_dict(load_file(run / "fold" / "model.safetensors"))
    return model.eval()


def _evaluation_split(run: Path, model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    from vitfold.pipeline.data import build_splits, parse_data_spec
    from vitfold.pipeline.models import data_transform

    rd = RunDir(run)
    split = build_splits(parse_data_spec(rd.config.data), data_transform(rd.config, model)).eval
    pairs = [split[i] for i in range(len(split))]
    return torch.stack([x for x, _ in pairs]), torch.tensor([int(y) for _, y in pairs])


def _ort_logits(path: Path, x: torch.Tensor) -> torch.Tensor:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])


def test_int8_onnx_is_qdq_with_per_channel_int8_weights(int8_run):
    fp32 = onnx.load(str(int8_run / "export" / "model.onnx"))
    quantized = onnx.load(str(int8_run / "export" / "model.int8.onnx"))
    weights = {t.name for t in fp32.graph.initializer}
    # every MatMul/Gemm of the fp32 graph that multiplies by a weight, counted from the fp32 file
    matmuls = [n for n in fp32.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights]
    init = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    ops = [n.op_type for n in quantized.graph.node]
    int8_weights = {name for name, a in init.items() if a.dtype == np.int8 and a.ndim == 2}
    assert len(matmuls) >= 5 and len(int8_weights) == len(matmuls)
    assert ops.count("QuantizeLinear") >= len(matmuls)  # activations quantized in the graph (static QDQ)
    weight_dq = [n for n in quantized.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in int8_weights]
    assert len(weight_dq) == len(matmuls)
    for node in weight_dq:  # per output channel: one scale per output of the weight ((in, out), or Gemm's (out, in))
        scale, weight = init[node.input[1]], init[node.input[0]]
        assert scale.ndim == 1 and len(scale) > 1 and len(scale) in weight.shape
    assert "Conv" in ops and "LayerNormalization" in ops and "Softmax" in ops  # left in float
    summary = json.loads((int8_run / "export" / "export.json").read_text())
    assert summary["int8"]["calibration"] == {"split": "train", "images": 200, "seed": 0}


def test_int8_row_is_judged_by_agreement_and_accuracy_on_the_whole_split(int8_run, tmp_path):
    run = copy_run(int8_run, tmp_path / "run")
    result = run_stage("verify", run, backends=["onnxruntime-int8"], **QUIET)
    rows = [r for r in result["results"] if r["backend"] == "onnxruntime-int8"]
    model = _folded_timm(run)
    x, labels = _evaluation_split(run, model)
    with torch.no_grad():
        reference = model(x).argmax(-1)
    predicted = _ort_logits(run / "export" / "model.int8.onnx", x).argmax(-1)
    agreement = float((predicted == reference).double().mean())
    delta = 100 * float((predicted == labels).double().mean() - (reference == labels).double().mean())
    assert float((reference == labels).double().mean()) > 0.6  # the fixture's model has margins
    assert len(rows) == 2 and all(r["precision"] == "int8" for r in rows)
    for row in rows:
        assert row["split_images"] == len(labels)
        assert row["split_top1_agreement"] == pytest.approx(agreement)
        assert row["accuracy_delta"] == pytest.approx(delta)
        assert row["passed"] is (agreement >= 0.99 and delta >= -0.5) is True
    assert result["passed"]


def _scale_weights_of_first_layer(dst: Path, factor: float) -> None:
    """Multiply the dequantization scale of the first quantized weight in `dst` by `factor`."""
    model = onnx.load(str(dst))
    init = {t.name: t for t in model.graph.initializer}
    node = next(
        n
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in init and len(init[n.input[0]].dims) == 2
    )
    scale = init[node.input[1]]
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * factor, scale.name))
    onnx.save(model, str(dst))


@pytest.mark.parametrize("fault", ["all-zero calibration", "one layer's scale x10"])
def test_a_planted_int8_fault_fails_verify_with_exit_1(int8_run, tmp_path, monkeypatch, fault):
    run = copy_run(int8_run, tmp_path / "run")
    if fault == "all-zero calibration":
        real = export_stage.calibration_images
        monkeypatch.setattr(export_stage, "calibration_images", lambda *a, **k: torch.zeros_like(real(*a, **k)))
    else:
        quantize = int8_module.quantize_onnx_int8

        def planted(src, dst, calibration, **options):
            _scale_weights_of_first_layer(quantize(src, dst, calibration, **options), 10.0)
            return dst

        monkeypatch.setattr(int8_module, "quantize_onnx_int8", planted)
    run_stage("export", run, formats=["onnx"], precision="int8", **QUIET)
    done = vitfold_cli("verify", str(run), "--backends", "onnxruntime-int8")
    assert done.returncode == 1, done.stdout + done.stderr
    rows = json.loads((run / "verify" / "verify.json").read_text())["results"]
    int8_rows = [r for r in rows if r["backend"] == "onnxruntime-int8"]
    assert int8_rows and not any(r["passed"] for r in int8_rows)
    assert all(r["passed"] for r in rows if r["backend"] == "torch-folded")  # the fold itself is fine


def test_tolerance_overrides_apply_where_the_precision_has_the_bar():
    flat = tolerances_for({"max_rel": 0.5})
    assert [flat[p].max_rel for p in ("fp32", "fp16", "bf16", "int8")] == [0.5, 0.5, 0.5, None]
    nested = tolerances_for({"int8": {"split_top1_min": 0.9}, "cosine_min": 0.5})
    assert nested["int8"] == Tolerance(split_top1_min=0.9, accuracy_delta_min=-0.5)
    assert nested["fp32"].cosine_min == 0.5 and nested["fp32"].max_rel == 1e-4
    assert nested["int8"].looser_than(DEFAULT_TOLERANCES["int8"]) == {"split_top1_min": 0.9}
    for bad, message in [({"maxrel": 1}, "unknown key 'maxrel'"), ({"int8": {"top1": 1}}, "tolerances.int8")]:
        with pytest.raises(VitfoldError, match=message):
            tolerances_for(bad)


def test_a_bar_without_its_statistic_fails_closed():
    int8 = DEFAULT_TOLERANCES["int8"]
    assert not int8.check({"max_rel": 0.0, "cosine_min": 1.0, "top1_agreement": 1.0})  # no split statistics
    assert int8.check({"split_top1_agreement": 0.995, "accuracy_delta": -0.4})
    assert not int8.check({"split_top1_agreement": 0.98, "accuracy_delta": 1.0})
    assert not int8.check({"split_top1_agreement": 1.0, "accuracy_delta": -0.6})


def test_split_stats_count_agreement_and_accuracy_change():
    """Four different values (agreement 5/8, accuracy 7/8, the reference's 6/8, a change of +12.5 points),
    so that any two swapped shows."""
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    reference = torch.tensor([0, 1, 2, 3, 0, 0, 1, 1])  # 6 of 8 right
    predicted = torch.tensor([0, 1, 2, 3, 4, 0, 2, 2])  # 7 of 8 right; agrees with the reference on 5 of 8
    stats = split_stats(predicted, reference, labels)
    assert stats["split_top1_agreement"] == 5 / 8 and stats["split_accuracy"] == 7 / 8
    assert stats["reference_accuracy"] == 6 / 8 and stats["accuracy_delta"] == pytest.approx(12.5)
    assert stats["split_images"] == 8
    assert split_stats(labels, reference, labels)["accuracy_delta"] == pytest.approx(25.0)


def test_calibration_images_are_distinct_images_of_the_training_split(exported_run):
    """int8 calibrates on training images only: each of the CALIBRATION_SAMPLES images is one of the training
    split's (by its index there), none is an evaluation image, and none is taken twice."""
    from vitfold.pipeline.data import build_splits, parse_data_spec
    from vitfold.pipeline.models import data_transform
    from vitfold.pipeline.stages.backends import folded_model
    from vitfold.pipeline.stages.export import calibration_images

    rd = RunDir(exported_run)
    model = folded_model(rd)
    splits = build_splits(parse_data_spec(rd.config.data), data_transform(rd.config, model))
    train = torch.stack([splits.train[i][0] for i in range(len(splits.train))]).flatten(1)  # [671, 3·16·16]
    held_out = torch.stack([splits.eval[i][0] for i in range(len(splits.eval))]).flatten(1)  # [225, 3·16·16]
    assert len(held_out) > CALIBRATION_SAMPLES  # an evaluation draw could fill the count: the test can tell
    images = calibration_images(rd, model, CALIBRATION_SAMPLES).flatten(1)  # [64, 3·16·16]
    assert len(images) == CALIBRATION_SAMPLES
    indices = [int((train == x).all(1).nonzero()[0]) for x in images]  # fails if an image is not a training one
    assert len(set(indices)) == CALIBRATION_SAMPLES
    assert not any(bool((held_out == x).all(1).any()) for x in images)


def test_bf16_is_refused_in_one_line_on_a_cpu_without_native_bf16(monkeypatch):
    import vitfold.export.precision as precision

    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    with pytest.raises(VitfoldError, match=r"^precision='bf16': on CPU needs AVX512_BF16 or AMX"):
        check_formats(["aoti"], "bf16", "cpu")


@pytest.mark.parametrize(
    ("formats", "precision", "message"),
    [("onnx", "bf16", "applies to aoti"), ("aoti", "fp16", r"aoti \(device cuda\)"), ("torchscript", "int8", "onnx")],
)
def test_a_precision_no_requested_format_has_exits_2(exported_run, tmp_path, formats, precision, message):
    run = copy_run(exported_run, tmp_path / "run")
    done = vitfold_cli("export", str(run), "--format", formats, "--precision", precision)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert re.search(message, done.stderr)


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no native bf16 (AVX512_BF16 or AMX)")
def test_aoti_bf16_package_computes_in_bf16_and_passes_its_gate(exported_run, tmp_path):
    run = copy_run(exported_run, tmp_path / "run")
    run_stage("export", run, formats=["aoti"], precision="bf16", **QUIET)
    result = run_stage("verify", run, backends=["aoti-bf16"], **QUIET)
    rows = [r for r in result["results"] if r["backend"] == "aoti-bf16"]
    assert rows and all(r["precision"] == "bf16" and r["passed"] for r in rows)
    # independently of vitfold: the package, loaded by torch, against the folded model in fp32
    import timm
    from safetensors.torch import load_file

    model = timm.create_model(TINY_RUN["backbone"], num_classes=5, **TINY_RUN["backbone_kwargs"])
    model.load_state_dict(load_file(run / "fold" / "model.safetensors"))
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    package = torch._inductor.aoti_load_package(str(run / "export" / "model.bf16.pt2"))
    with torch.no_grad():
        out, fp32 = package(x), model.eval()(x)
    assert out.dtype == torch.float32  # float32 in and out, bf16 inside
    assert 1e-4 < rel(out, fp32) < 3e-2  # not fp32 arithmetic, and within bf16's rounding


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fp16_package_and_cuda_graph_replay(exported_run, tmp_path):
    from vitfold.export.precision import at_precision
    from vitfold.export.runners import CudaGraphRunner, open_runner
    from vitfold.pipeline.stages.backends import folded_model

    run = copy_run(exported_run, tmp_path / "run")
    run_stage("export", run, formats=["aoti"], precision="fp16", device="cuda", **QUIET)
    result = run_stage("verify", run, backends=["aoti-fp16"], device="cuda", **QUIET)
    assert result["passed"] and {r["precision"] for r in result["results"] if r["kind"] == "export"} == {"fp16"}
    x = torch.randn(2, 3, 16, 16, device="cuda")
    with open_runner("torch", at_precision(folded_model(RunDir(run)), "fp16"), "cuda") as runner:
        direct = runner(x).clone()
        replayed = CudaGraphRunner(runner)
        assert torch.equal(replayed(x), direct) and torch.equal(replayed(x * 1), direct)
        assert not torch.equal(replayed(x + 1), direct)  # the graph reads each new input
