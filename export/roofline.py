"""How far a CPU backend is from this machine's limit: the FLOPs of a model's forward, and the matmul peak of
each precision measured here at the same thread count.

    flops = forward_flops(model, x)                     # a multiply-add counts 2; attention's matmuls included
    peaks = matmul_peaks(threads=2)                     # {"fp32": GFLOP/s, "bf16": ..., "int8": ...}
    achieved = flops / 1e9 / (p50_ms / 1e3)             # GFLOP/s of one row; of_peak = achieved / peaks[precision]

The peak of a precision is the best of its square matmuls (n = 1024 and 2048), timed in rounds that
alternate them: fp32 by torch.mm and ONNX Runtime's MatMul, bf16 by torch.mm (only where the CPU has native
BF16), int8 by ONNX Runtime's MatMulInteger (uint8 x int8 -> int32, the VNNI kernels its INT8 models use).
"""

from __future__ import annotations

from collections.abc import Callable

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
    return found


def matmul_peaks(threads: int, rounds: int = 3, iters: int = 1) -> dict[str, float]:
    """precision -> the best GFLOP/s of its matmuls here (median over `rounds` alternating rounds)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        variants = peak_variants(threads)
        samples = interleaved_rounds({k: v[2] for k, v in variants.items()}, warmup=1, iters=iters, rounds=rounds)
    finally:
        torch.set_num_threads(previous)
    peaks: dict[str, float] = {}
    for name, (precision, flops, _) in variants.items():
        rate = flops / float(np.median(samples[name])) / 1e6  # ms per call -> GFLOP/s
        peaks[precision] = max(peaks.get(precision, 0.0), rate)
    return peaks
