"""How far a CPU backend is from this machine's limit: the FLOPs of a model's forward, and the matmul peak of
each precision measured here at the same thread count.

    flops = forward_flops(model, x)                     # a multiply-add counts 2; attention's matmuls included
    peaks = matmul_peaks(threads=2)                     # {"fp32": Peak(GFLOP/s, by), "bf16": ..., "int8": ...}
    achieved = flops / 1e9 / (p50_ms / 1e3)             # GFLOP/s of one row; of_peak = achieved / peaks[precision]

The peak of a precision is the best of its square matmuls (n = 1024 and 2048), timed in rounds that
alternate them: fp32 by torch.mm and ONNX Runtime's MatMul, bf16 by torch.mm (only where the CPU has native
BF16), int8 by ONNX Runtime's MatMulInteger (uint8 x int8 -> int32, the VNNI kernels its INT8 models use);
and, where OpenVINO is installed, by OpenVINO's CPU plugin in each precision (int8: a MatMul between two
FakeQuantize ops, u8 activations and i8 weights, which the plugin runs as its INT8 brgemm kernel, as it runs
an NNCF IR). Without OpenVINO the int8 peak is ONNX Runtime's, which is not this CPU's INT8 limit: on a
2-core AVX-512 VNNI VM, 2026-12-04, OpenVINO's int8 matmul ran at 1.5 TFLOP/s, ONNX Runtime's at 0.6-1.1.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vitfold.export.isa import cpu_has_bf16
from vitfold.export.timing import interleaved_rounds

MATMUL_SIZES = (1024, 2048)
# ONNX's IR 9: what ONNX Runtime 1.30 reads too (it refuses IR 14, onnx 1.23's default)
ONNX_IR_VERSION = 9


def forward_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward of `model` on `x` (a multiply-add counts 2), attention included (math path)."""
    with torch.inference_mode(), sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


def torch_call(fn: Callable[..., object], *args: torch.Tensor) -> Callable[[], None]:
    """`fn(*args)` under inference mode, as a call without arguments."""

    def run() -> None:
        with torch.inference_mode():
            fn(*args)

    return run


def onnx_matmul(n: int, threads: int, integer: bool = False) -> Callable[[], None]:
    """ONNX Runtime's own n x n matmul: MatMul in fp32, or MatMulInteger (uint8 x int8) with `integer`."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    if integer:
        op, types, out = "MatMulInteger", (TensorProto.UINT8, TensorProto.INT8), TensorProto.INT32
    else:
        op, types, out = "MatMul", (TensorProto.FLOAT, TensorProto.FLOAT), TensorProto.FLOAT
    graph = helper.make_graph(
        [helper.make_node(op, ["a", "b"], ["c"])],
        "matmul",
        [helper.make_tensor_value_info(name, t, [n, n]) for name, t in zip(("a", "b"), types, strict=True)],
        [helper.make_tensor_value_info("c", out, [n, n])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=ONNX_IR_VERSION)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(model.SerializeToString(), options, ["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    if integer:
        feeds = {"a": rng.integers(0, 255, (n, n), dtype=np.uint8), "b": rng.integers(-127, 127, (n, n), dtype=np.int8)}
    else:
        feeds = {name: rng.standard_normal((n, n), dtype=np.float32) for name in ("a", "b")}
    return lambda: session.run(None, feeds)


def openvino_matmul(n: int, threads: int, precision: str) -> Callable[[], None]:
    """OpenVINO's n x n matmul against a constant weight (its FullyConnected) in `precision`; int8 as an NNCF
    IR holds it: FakeQuantize on the activations (256 levels over [0, 4]: u8) and the weights (255 levels
    over [-4, 4]: i8) before the MatMul."""
    import openvino as ov
    import openvino.opset13 as ops

    def fake_quantize(node: Any, low: float, high: float, levels: int) -> Any:
        lo, hi = ops.constant(np.float32(low)), ops.constant(np.float32(high))
        return ops.fake_quantize(node, lo, hi, lo, hi, levels)

    rng = np.random.default_rng(0)
    x = ops.parameter([n, n], np.float32, name="a")
    a, w = x, ops.constant(rng.standard_normal((n, n), dtype=np.float32))
    if precision == "int8":
        a, w = fake_quantize(a, 0.0, 4.0, 256), fake_quantize(w, -4.0, 4.0, 255)
    model = ov.Model([ops.matmul(a, w, False, True)], [x])
    config = {
        "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
        "INFERENCE_NUM_THREADS": str(threads),
        "PERFORMANCE_HINT": "LATENCY",
    }
    request = ov.Core().compile_model(model, "CPU", config).create_infer_request()
    feed = rng.random((n, n), dtype=np.float32) * 4  # [0, 4): in the activations' quantization range
    return lambda: request.infer({0: feed})


def peak_variants(threads: int, bf16: bool | None = None) -> dict[str, tuple[str, float, Callable[[], None]]]:
    """name -> (precision, FLOPs per call, call) for the matmuls that measure each precision's peak."""
    bf16 = cpu_has_bf16() if bf16 is None else bf16
    found: dict[str, tuple[str, float, Callable[[], None]]] = {}
    for n in MATMUL_SIZES:
        for precision, dtype in [("fp32", torch.float32), *([("bf16", torch.bfloat16)] if bf16 else [])]:
            a, b = (torch.randn(n, n, generator=torch.Generator().manual_seed(i)).to(dtype) for i in (0, 1))
            found[f"matmul torch {precision} n={n}"] = (precision, 2.0 * n**3, torch_call(torch.mm, a, b))
        found[f"matmul onnxruntime fp32 n={n}"] = ("fp32", 2.0 * n**3, onnx_matmul(n, threads))
        found[f"matmul onnxruntime int8 n={n}"] = ("int8", 2.0 * n**3, onnx_matmul(n, threads, integer=True))
        if importlib.util.find_spec("openvino") is not None:
            for precision in ("fp32", *(["bf16"] if bf16 else []), "int8"):
                found[f"matmul openvino {precision} n={n}"] = (
                    precision,
                    2.0 * n**3,
                    openvino_matmul(n, threads, precision),
                )
    return found


class Peak(NamedTuple):
    """A precision's matmul peak here: GFLOP/s, and the variant of `peak_variants` that reached it."""

    gflop_per_s: float
    by: str


def matmul_peaks(threads: int, rounds: int = 5, iters: int = 2) -> dict[str, Peak]:
    """precision -> the best of its matmuls here (median GFLOP/s over `rounds` alternating rounds, each turn
    after one untimed call: a runtime's first call after another's runs up to 3x slower on a 2-core VM).
    About 6 s at 2 threads there; three rounds of one call had read fp32 anywhere from 350 to 470."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        variants = peak_variants(threads)
        samples = interleaved_rounds(
            {k: v[2] for k, v in variants.items()}, warmup=1, iters=iters, rounds=rounds, round_warmup=1
        )
    finally:
        torch.set_num_threads(previous)
    peaks: dict[str, Peak] = {}
    for name, (precision, flops, _) in variants.items():
        rate = flops / float(np.median(samples[name])) / 1e6  # ms per call -> GFLOP/s
        if precision not in peaks or rate > peaks[precision].gflop_per_s:
            peaks[precision] = Peak(rate, name)
    return peaks
