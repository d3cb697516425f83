"""The OpenVINO runner: an IR (`.xml` + `.bin`) compiled for the CPU plugin, for latency.

    with open_runner("openvino", "out/model.int8.xml", threads=2) as runner:
        logits = runner(images)                       # (B, 3, H, W) f32 -> (B, num_classes) f32

Compiled with every setting that decides its numbers or its speed given explicitly:
INFERENCE_PRECISION_HINT (the precision the IR records, `export.openvino`: f32, or bf16 for model.bf16.xml;
OpenVINO's own default on a CPU with BF16 would be bf16), INFERENCE_NUM_THREADS, PERFORMANCE_HINT=LATENCY
(one stream, one request at a time) and NUM_STREAMS=1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vitfold.errors import VitfoldError
from vitfold.export.openvino import IR_PRECISION, PRECISION_HINTS, require_openvino
from vitfold.export.runners import Runner


def ir_precision(model: Any) -> str:
    """The vitfold precision an IR was written for (fp32 when it records none: an IR made elsewhere)."""
    return model.get_rt_info(list(IR_PRECISION)).astype(str) if model.has_rt_info(list(IR_PRECISION)) else "fp32"


def compile_config(precision: str, threads: int | None) -> dict[str, str]:
    """The CPU plugin's settings for an IR of `precision` at `threads` (None: OpenVINO's choice)."""
    config = {
        "INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision],
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": "1",
    }
    if threads:
        config["INFERENCE_NUM_THREADS"] = str(threads)
    return config


class OpenVINORunner(Runner):
    """An OpenVINO IR on the CPU plugin, one infer request, inputs shared with the torch tensor."""

    runtime = "openvino"

    def __init__(self, path: Path, device: str, threads: int | None = None) -> None:
        if torch.device(device).type != "cpu":
            raise VitfoldError(f"backend openvino: runs on the CPU here, not {device}")
        ov = require_openvino()
        super().__init__(device)
        core = ov.Core()
        model = core.read_model(str(path))
        self.precision = ir_precision(model)
        if self.precision not in PRECISION_HINTS:
            raise VitfoldError(f"{path}: its runtime info names precision '{self.precision}', which vitfold has not")
        self.compiled = core.compile_model(model, "CPU", compile_config(self.precision, threads))
        self.request = self.compiled.create_infer_request()
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # f32 | bf16: as compiled
        self.provider = f"OpenVINO CPU ({hint})"
        self.settings = {
            "threads": int(self.compiled.get_property("INFERENCE_NUM_THREADS")),
            "precision_hint": hint,
            "performance_hint": str(self.compiled.get_property("PERFORMANCE_HINT")),
            "streams": int(self.compiled.get_property("NUM_STREAMS")),
        }

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.request.infer({0: x.numpy()}, share_outputs=False)[0])

    def close(self) -> None:
        self.request = self.compiled = None
