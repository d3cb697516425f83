"""The OpenVINO runner: an IR (`.xml` + `.bin`) compiled for the CPU plugin, for latency.

    with open_runner("openvino", "out/model.int8.xml", threads=2) as runner:
        logits = runner(images)                       # (B, 3, H, W) f32 -> (B, num_classes) f32

Compiled with every setting that decides its numbers or its speed given explicitly:
INFERENCE_PRECISION_HINT (`float_ops_hint`: f32 for model.xml, bf16 for model.bf16.xml; for the INT8 IR,
whose float ops are LayerNorm, softmax, GELU and the residual adds, bf16 on a CPU with AMX and f32 elsewhere;
OpenVINO's own default on a CPU with BF16 would be bf16 for all three), INFERENCE_NUM_THREADS,
PERFORMANCE_HINT=LATENCY (one stream, one request at a time) and NUM_STREAMS=1.

The IR's batch axis is dynamic (`?`); the runner compiles it once per input shape it is called with, with
that shape fixed (`Model.reshape`), and keeps the last `STATIC_SHAPES_KEPT` compiled shapes. A static shape
lets the CPU plugin pick its kernels and lay out its memory once: ViT-S/16 at batch 1 ran 3-5 % faster
than the dynamic compile on a 2-core AVX-512 VM (2026-12-04, int8, bf16 and fp32 alike), and a compile
costs 0.2-0.5 s, once per batch size.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from vitfold.errors import VitfoldError
from vitfold.export.isa import cpu_has_amx_bf16
from vitfold.export.openvino import IR_PRECISION, PRECISION_HINTS, require_openvino
from vitfold.export.runners import Runner

STATIC_SHAPES_KEPT = 4  # compiled input shapes the runner holds (least recently used dropped first)


def ir_precision(model: Any) -> str:
    """The vitfold precision an IR was written for (fp32 when it records none: an IR made elsewhere)."""
    return model.get_rt_info(list(IR_PRECISION)).astype(str) if model.has_rt_info(list(IR_PRECISION)) else "fp32"


def float_ops_hint(precision: str, amx: bool | None = None) -> str:
    """INFERENCE_PRECISION_HINT for an IR of `precision`: the one it records, except that the INT8 IR's float
    ops run bf16 on a CPU with AMX (`amx`, None: this CPU's). ViT-S/16 INT8 ran 1.12x faster at batch 1 and
    1.22x at batch 8 with them in bf16 on a 2-core AMX Xeon (cosine 0.99999 to f32; `benchmarks/openvino_compile.py
    --compare float-ops`), and 1.34x slower on an AVX512_BF16 EPYC without AMX (2026-12-04)."""
    amx = cpu_has_amx_bf16() if amx is None else amx
    return "bf16" if precision == "int8" and amx else PRECISION_HINTS[precision]


def compile_config(precision: str, threads: int | None) -> dict[str, str]:
    """The CPU plugin's settings for an IR of `precision` at `threads` (None: OpenVINO's choice)."""
    config = {
        "INFERENCE_PRECISION_HINT": float_ops_hint(precision),
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": "1",
    }
    if threads:
        config["INFERENCE_NUM_THREADS"] = str(threads)
    return config


class OpenVINORunner(Runner):
    """An OpenVINO IR on the CPU plugin: one infer request per input shape, inputs shared with the torch tensor."""

    runtime = "openvino"

    def __init__(self, path: Path, device: str, threads: int | None = None) -> None:
        if torch.device(device).type != "cpu":
            raise VitfoldError(f"backend openvino: runs on the CPU here, not {device}")
        ov = require_openvino()
        super().__init__(device)
        self.path, self.core = path, ov.Core()
        self.model = self.core.read_model(str(path))
        self.precision = ir_precision(self.model)
        if self.precision not in PRECISION_HINTS:
            raise VitfoldError(f"{path}: its runtime info names precision '{self.precision}', which vitfold has not")
        self.config = compile_config(self.precision, threads)
        self.requests: OrderedDict[tuple[int, ...], Any] = OrderedDict()  # input shape -> its infer request
        compiled = self.core.compile_model(self.model, "CPU", self.config)  # dynamic: what the settings become
        hint = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # f32 | bf16: as compiled
        self.provider = f"OpenVINO CPU ({hint})"
        self.settings = {
            "threads": int(compiled.get_property("INFERENCE_NUM_THREADS")),
            "precision_hint": hint,
            "performance_hint": str(compiled.get_property("PERFORMANCE_HINT")),
            "streams": int(compiled.get_property("NUM_STREAMS")),
            "static_shapes": True,
        }

    def request_for(self, shape: tuple[int, ...]) -> Any:
        """The infer request of a model compiled for input `shape` (compiled on first use)."""
        if shape in self.requests:
            self.requests.move_to_end(shape)
        else:
            model = self.model.clone()
            try:
                model.reshape({model.inputs[0]: list(shape)})
            except RuntimeError as error:
                first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                raise VitfoldError(f"{self.path}: does not take input shape {list(shape)}: {first}") from None
            self.requests[shape] = self.core.compile_model(model, "CPU", self.config).create_infer_request()
            if len(self.requests) > STATIC_SHAPES_KEPT:
                self.requests.popitem(last=False)
        return self.requests[shape]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.request_for(tuple(x.shape)).infer({0: x.numpy()}, share_outputs=False)[0])

    def close(self) -> None:
        self.requests.clear()
        self.model = self.core = None
