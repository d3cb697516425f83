"""Runners: one interface over every way of computing the model's logits.

A runner is opened on a run directory (`open_runner(name, run_dir, device)`), takes an image batch
already on its device (`to_device`), returns logits on that device (`__call__`), and is closed with
`close()`. Runtimes are imported when a runner opens, so a missing optional dependency only matters
to the runner that needs it; `unavailable(name, run_dir, device)` says why one cannot run.

    torch-unmerged  base backbone + trained adapter (the reference)
    torch-folded    fold/model.safetensors loaded by timm
    torch-base      the plain base architecture (latency baseline)
    torchscript     export/model.pt      onnxruntime  export/model.onnx (CPU or CUDA EP, TF32 off)
    aoti            export/model.pt2     onnxruntime-fp16  export/model.fp16.onnx
    tensorrt        export/model.plan

Torch runners and onnxruntime can also return every transformer block's output (`block_outputs`),
which verify uses to name the first block where a backend diverges.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from export import FILES
from export.artifacts import INPUT_NAME, OUTPUT_NAME
from pipeline.errors import VitfoldError
from pipeline.manifest import verified_input

BACKEND_FORMATS = {"torchscript": "torchscript", "onnxruntime": "onnx", "onnxruntime-fp16": "onnx-fp16",
                   "aoti": "aoti", "tensorrt": "tensorrt"}  # fmt: skip
ARTIFACTS = {backend: FILES[fmt] for backend, fmt in BACKEND_FORMATS.items()}  # the file in RUN/export/
MODULES = {"onnxruntime": "onnxruntime", "onnxruntime-fp16": "onnxruntime", "tensorrt": "tensorrt"}
TORCH_INPUTS = {"torch-unmerged": "train/adapter.safetensors", "torch-folded": "fold/model.safetensors",
                "torch-base": "fold/model.safetensors"}  # fmt: skip
TORCH_RUNNERS = tuple(TORCH_INPUTS)
RUNNER_NAMES = (*TORCH_RUNNERS, "torchscript", "onnxruntime", "onnxruntime-fp16", "aoti", "tensorrt")


class Runner:
    """Base: logits of an image batch on `device`. Subclasses set `provider` when it is not the device."""

    name = ""

    def __init__(self, device: str) -> None:
        self.device = torch.device(device)
        self.provider = self.device.type

    @property
    def label(self) -> str:
        return f"{self.name} ({self.provider})"

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, torch.float32).contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, num_classes)
        raise NotImplementedError

    def block_outputs(self, x: torch.Tensor) -> list[torch.Tensor] | None:
        """Each transformer block's output (B, N, D), or None when the runtime cannot expose them."""
        return None

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def close(self) -> None:
        """Release the runtime's resources (sessions, engines, device memory)."""


class TorchRunner(Runner):
    """An eager nn.Module; block outputs through forward hooks on `model.blocks`."""

    def __init__(self, name: str, model: nn.Module, device: str) -> None:
        super().__init__(device)
        self.name, self.model = name, model.eval().to(self.device)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    @torch.no_grad()
    def block_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        captured: list[torch.Tensor] = []
        hooks = [b.register_forward_hook(lambda _m, _i, out: captured.append(out)) for b in self.model.blocks]
        try:
            self.model(x)
        finally:
            for h in hooks:
                h.remove()
        return captured

    def close(self) -> None:
        del self.model


class TorchScriptRunner(Runner):
    name = "torchscript"

    def __init__(self, path: Path, device: str) -> None:
        super().__init__(device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation: the README says so
            self.module = torch.jit.load(str(path), map_location=self.device)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


class AOTIRunner(Runner):
    name = "aoti"

    def __init__(self, path: Path, device: str) -> None:
        super().__init__(device)
        self.package = torch._inductor.aoti_load_package(str(path))

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.package(x)


class OnnxRuntimeRunner(Runner):
    """ONNX Runtime: CPU EP on cpu; CUDA EP (TF32 off, IO binding to torch tensors) on cuda."""

    def __init__(self, path: Path, device: str, threads: int | None = None, name: str = "onnxruntime") -> None:
        super().__init__(device)
        self.name = name
        self.path, self.threads = path, threads
        if self.device.type == "cuda":
            index = self.device.index or 0
            self.providers: list[Any] = [("CUDAExecutionProvider", {"device_id": index, "use_tf32": 0})]
        else:
            self.providers = ["CPUExecutionProvider"]
        self.session = self._session(str(path))
        self.provider = self.session.get_providers()[0]
        if self.device.type == "cuda" and self.provider != "CUDAExecutionProvider":
            raise VitfoldError(f"onnxruntime has no CUDA execution provider here ({self.provider}): "
                               "pip install 'vitfold[gpu]'")  # fmt: skip
        self._debug_session = None

    def _session(self, model: str | bytes) -> Any:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if self.threads:
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
        return ort.InferenceSession(model, options, providers=self.providers)

    def _run(self, session: Any, x: torch.Tensor, names: list[str]) -> list[torch.Tensor]:
        if self.device.type == "cpu":
            return [torch.from_numpy(o) for o in session.run(names, {INPUT_NAME: x.numpy()})]
        binding = session.io_binding()
        binding.bind_input(INPUT_NAME, "cuda", self.device.index or 0, "float32", tuple(x.shape), x.data_ptr())
        for name in names:
            binding.bind_output(name, "cuda", self.device.index or 0)
        session.run_with_iobinding(binding)
        return [torch.from_dlpack(o) if hasattr(o, "__dlpack__") else torch.as_tensor(o.numpy(), device=self.device)
                for o in binding.get_outputs()]  # fmt: skip

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(self.session, x, [OUTPUT_NAME])[0]

    def block_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self._debug_session is None:
            from export.onnx_blocks import with_block_outputs

            model, self._block_names = with_block_outputs(self.path)
            self._debug_session = self._session(model.SerializeToString())
        return [o.float() for o in self._run(self._debug_session, x, self._block_names)]

    def close(self) -> None:
        self.session = self._debug_session = None


class TensorRTRunner(Runner):
    """A TensorRT engine run with `execute_async_v3` on torch CUDA tensors (no host copies)."""

    name = "tensorrt"

    def __init__(self, path: Path, device: str) -> None:
        from export.tensorrt import require_tensorrt

        trt = require_tensorrt()
        super().__init__(device if device.startswith("cuda") else "cuda")
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise VitfoldError(f"{path}: TensorRT could not load this plan (built for another GPU or version?)")
        self.context = self.engine.create_execution_context()
        self.num_classes = int(self.engine.get_tensor_shape(OUTPUT_NAME)[-1])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty(len(x), self.num_classes, device=self.device)
        self.context.set_input_shape(INPUT_NAME, tuple(x.shape))
        self.context.set_tensor_address(INPUT_NAME, x.data_ptr())
        self.context.set_tensor_address(OUTPUT_NAME, out.data_ptr())
        self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream)
        return out

    def close(self) -> None:
        self.context = self.engine = None


def default_backends(run_dir: Path, names: tuple[str, ...]) -> list[str]:
    """`names`, less onnxruntime-fp16 when no fp16 ONNX was exported (an option, not a missing artifact)."""
    fp16 = (run_dir / "export" / ARTIFACTS["onnxruntime-fp16"]).is_file()
    return [n for n in names if n != "onnxruntime-fp16" or fp16]


def runner_inputs(name: str) -> list[str]:
    """The run-directory files backend `name` reads (an ONNX file's `.data` beside it, when there is one)."""
    if name in TORCH_INPUTS:
        return [TORCH_INPUTS[name]]
    path = f"export/{ARTIFACTS[name]}"
    return [path, f"{path}.data"] if path.endswith(".onnx") else [path]


def unavailable(name: str, run_dir: Path, device: str) -> str | None:
    """Why runner `name` cannot run on `device` for this run (None when it can)."""
    if name not in RUNNER_NAMES:
        return f"unknown backend '{name}' (choose from {', '.join(RUNNER_NAMES)})"
    if device.startswith("cuda") and not torch.cuda.is_available():
        return "no CUDA GPU visible"
    if name in MODULES and importlib.util.find_spec(MODULES[name]) is None:
        return f"the {MODULES[name]} package is not installed"
    if name == "tensorrt" and not torch.cuda.is_available():
        return "TensorRT needs a CUDA GPU"
    if name.startswith("onnxruntime") and device.startswith("cuda"):
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return "this onnxruntime build has no CUDAExecutionProvider (pip install 'vitfold[gpu]')"
    if name in ARTIFACTS and not (run_dir / "export" / ARTIFACTS[name]).is_file():
        return f"export/{ARTIFACTS[name]} not built (vitfold export --format ...)"
    return None


def open_runner(name: str, run_dir: Path, device: str = "cpu", threads: int | None = None) -> Runner:
    """Open backend `name` for the run in `run_dir` (check `unavailable` first for a reason)."""
    reason = unavailable(name, run_dir, device)
    if reason:
        raise VitfoldError(f"backend {name}: {reason}")
    if device.startswith("cuda"):  # fp32 means fp32: no TF32 in torch's matmuls and convolutions either
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    if name in TORCH_RUNNERS:
        from export.models import base_model, folded_model, unmerged_model

        build = {"torch-unmerged": unmerged_model, "torch-folded": folded_model, "torch-base": base_model}[name]
        return TorchRunner(name, build(run_dir), device)
    path = verified_input(run_dir, run_dir / "export" / ARTIFACTS[name], "export")  # refuses a changed artifact
    if name.startswith("onnxruntime"):
        return OnnxRuntimeRunner(path, device, threads, name)
    return {"torchscript": TorchScriptRunner, "aoti": AOTIRunner, "tensorrt": TensorRTRunner}[name](path, device)
