"""Runners: one interface over every way of computing a model's logits, opened by path.

    with open_runner("onnxruntime", "out/model.onnx", device="cpu") as runner:
        logits = runner(runner.to_device(images))          # (B, 3, H, W) -> (B, num_classes)

Runtimes (the `backend` of `open_runner`):

    torch        an nn.Module (pass the model instead of a path)
    torchscript  a `.pt` from torch.jit          onnxruntime  a `.onnx` (CPU EP, or CUDA EP with TF32 off)
    aoti         a `.pt2` AOTInductor package    tensorrt     a `.plan` (needs the [trt] extra and a GPU)
    openvino     an OpenVINO IR `.xml` (+ `.bin`) on the CPU (the [openvino] extra; `openvino_runner`)

A runtime is imported when its runner opens, so a missing optional dependency only matters to the
runner that needs it; `unavailable(backend, device)` says why one cannot run. Torch runners and
onnxruntime can also return every transformer block's output (`block_outputs`), which verify uses to
name the first block where a backend diverges. Each runner's `settings` are its runtime's thread and
spin settings, which bench.json records.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitfold.errors import VitfoldError, first_line
from vitfold.export import file_sha256
from vitfold.export.artifacts import INPUT_NAME, OUTPUT_NAME
from vitfold.export.blocks import block_names

RUNTIMES = ("torch", "torchscript", "onnxruntime", "aoti", "tensorrt", "openvino")
RUNTIME_OF_SUFFIX = {
    ".onnx": "onnxruntime",
    ".pt": "torchscript",
    ".pt2": "aoti",
    ".plan": "tensorrt",
    ".engine": "tensorrt",
    ".xml": "openvino",
}
MODULES = {"onnxruntime": "onnxruntime", "tensorrt": "tensorrt", "openvino": "openvino"}  # optional packages
# the OpenMP settings torch's CPU threads read when torch starts (unset: libgomp spins a while after each op)
OPENMP_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


class Runner:
    """Base: logits of an image batch on `device`. `provider` says what computes them when it is not
    simply the device (an ONNX Runtime execution provider)."""

    runtime = ""
    block_names: list[str] | None = None  # the names of `block_outputs`, where the runner knows them

    def __init__(self, device: str) -> None:
        self.device = torch.device(device)
        self.provider = self.device.type
        self.settings: dict[str, Any] = torch_thread_settings() if self.device.type == "cpu" else {}

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, torch.float32).contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, num_classes)
        raise NotImplementedError

    def block_outputs(self, x: torch.Tensor) -> list[torch.Tensor] | None:
        """Each transformer block's output (ViT (B, N, D), Swin (B, H, W, C)), or None when the runtime cannot
        expose them."""
        return None

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def close(self) -> None:
        """Release the runtime's resources (sessions, engines, device memory)."""


def torch_thread_settings() -> dict[str, Any]:
    """torch's CPU threads now and the OpenMP environment they started with (spinning after each op unless
    OMP_WAIT_POLICY=PASSIVE)."""
    return {"threads": torch.get_num_threads(), **{k: os.environ.get(k) for k in OPENMP_ENV}}


class TorchRunner(Runner):
    """An eager nn.Module; block outputs through forward hooks on its blocks (`blocks.i`, `layers.i.blocks.j`)."""

    runtime = "torch"

    def __init__(self, model: nn.Module, device: str) -> None:
        super().__init__(device)
        self.model = model.eval().to(self.device)
        self.block_names = block_names(model)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    @torch.no_grad()
    def block_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        captured: list[torch.Tensor] = []
        blocks = [self.model.get_submodule(name) for name in self.block_names]
        hooks = [b.register_forward_hook(lambda _m, _i, out: captured.append(out)) for b in blocks]
        try:
            self.model(x)
        finally:
            for h in hooks:
                h.remove()
        return captured

    def close(self) -> None:
        del self.model


class TorchScriptRunner(Runner):
    runtime = "torchscript"

    def __init__(self, path: Path, device: str) -> None:
        super().__init__(device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation: the README says so
            self.module = torch.jit.load(str(path), map_location=self.device)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


class AOTIRunner(Runner):
    runtime = "aoti"

    def __init__(self, path: Path, device: str) -> None:
        from vitfold.export.aoti import quiet_cuda_runtime_warning

        super().__init__(device)
        if not zipfile.is_zipfile(path):  # before torch, which logs warnings about it first
            raise VitfoldError(f"{path} is not an AOTInductor package (not a zip archive)")
        quiet_cuda_runtime_warning()
        self.package = torch._inductor.aoti_load_package(str(path))

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.package(x)


def io_name(kind: str, names: list[str], chosen: str | None, path: Path) -> str:
    """The graph's one `kind` ("input" or "output") of `names`, or `chosen` among them; a one-line
    `VitfoldError` naming the argument (--input-name / --output-name) and listing the names otherwise."""
    if chosen is not None and chosen not in names:
        raise VitfoldError(
            f"{path} has no {kind} '{chosen}' (its {kind}s: {', '.join(names)})", argument=f"{kind}_name"
        )
    if chosen is None and len(names) != 1:
        raise VitfoldError(
            f"{path} has {len(names)} {kind}s ({', '.join(names) or 'none'}): say which holds the "
            + ("images" if kind == "input" else "logits"),
            argument=f"{kind}_name",
        )
    return chosen or names[0]


class OnnxRuntimeRunner(Runner):
    """ONNX Runtime: CPU EP on cpu; CUDA EP (TF32 off, IO binding to torch tensors) on cuda. Any graph with one
    image input and one logits output (any names; `input_name`/`output_name` choose among several), float32
    or float16 input. `spin`: whether the intra-op pool's threads spin after a call
    (`session.intra_op.allow_spinning`; None: ONNX Runtime's default, spinning), which takes the cores from
    whatever runs next."""

    runtime = "onnxruntime"

    def __init__(
        self,
        path: Path,
        device: str,
        threads: int | None = None,
        spin: bool | None = None,
        input_name: str | None = None,
        output_name: str | None = None,
    ) -> None:
        super().__init__(device)
        self.path, self.threads, self.spin = path, threads, spin
        if self.device.type == "cuda":
            index = self.device.index or 0
            self.providers: list[Any] = [("CUDAExecutionProvider", {"device_id": index, "use_tf32": 0})]
        else:
            self.providers = ["CPUExecutionProvider"]
        self.session = self._session(str(path))
        inputs = {i.name: i.type for i in self.session.get_inputs()}
        self.input_name = io_name("input", list(inputs), input_name, path)
        self.output_name = io_name("output", [o.name for o in self.session.get_outputs()], output_name, path)
        self.input_type = "float16" if inputs[self.input_name] == "tensor(float16)" else "float32"
        batch = next(i.shape[0] for i in self.session.get_inputs() if i.name == self.input_name)
        self.fixed_batch = batch if isinstance(batch, int) and batch > 0 else None  # None: a dynamic batch
        self.provider = self.session.get_providers()[0]
        self.settings = {
            "intra_op_num_threads": threads,
            "inter_op_num_threads": 1 if threads else None,
            "allow_spinning": True if spin is None else spin,
        }
        if self.device.type == "cuda" and self.provider != "CUDAExecutionProvider":
            raise VitfoldError(f"onnxruntime has no CUDA execution provider here ({self.provider}): {ort_gpu_fix()}")
        self._debug_session = None

    def _session(self, model: str | bytes) -> Any:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if self.threads:
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
        if self.spin is not None:
            options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spin else "0")
        return ort.InferenceSession(model, options, providers=self.providers)

    def _run(self, session: Any, x: torch.Tensor, names: list[str]) -> list[torch.Tensor]:
        """Outputs `names` for the batch `x`; a graph of fixed batch b is fed chunks of b (the last one padded
        with copies of its last image, whose outputs are dropped)."""
        b = self.fixed_batch
        if b is None or len(x) == b:
            return self._run_batch(session, x, names)
        parts = []
        for chunk in x.split(b):
            padded = torch.cat([chunk, chunk[-1:].expand(b - len(chunk), *chunk.shape[1:])])  # (b, 3, H, W)
            parts.append([o[: len(chunk)] for o in self._run_batch(session, padded, names)])
        return [torch.cat(outs) for outs in zip(*parts, strict=True)]

    def _run_batch(self, session: Any, x: torch.Tensor, names: list[str]) -> list[torch.Tensor]:
        x = x.to(getattr(torch, self.input_type)).contiguous()
        if self.device.type == "cpu":
            return [torch.from_numpy(o) for o in session.run(names, {self.input_name: x.numpy()})]
        binding = session.io_binding()
        index = self.device.index or 0
        binding.bind_input(self.input_name, "cuda", index, self.input_type, tuple(x.shape), x.data_ptr())
        for name in names:
            binding.bind_output(name, "cuda", self.device.index or 0)
        session.run_with_iobinding(binding)
        return [
            torch.from_dlpack(o) if hasattr(o, "__dlpack__") else torch.as_tensor(o.numpy(), device=self.device)
            for o in binding.get_outputs()
        ]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(self.session, x, [self.output_name])[0].float()

    def block_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self._debug_session is None:
            from vitfold.export.onnx_blocks import with_block_outputs

            model, self._block_names = with_block_outputs(self.path)
            self._debug_session = self._session(model.SerializeToString())
        return [o.float() for o in self._run(self._debug_session, x, self._block_names)]

    def close(self) -> None:
        self.session = self._debug_session = None


class TensorRTRunner(Runner):
    """A TensorRT engine run with `execute_async_v3` on torch CUDA tensors (no host copies)."""

    runtime = "tensorrt"

    def __init__(self, path: Path, device: str) -> None:
        from vitfold.export.tensorrt import require_tensorrt

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


class CudaGraphRunner(Runner):
    """`runner` replayed from a CUDA graph captured once per input shape (no per-kernel launch cost).

    The graph reads a static input buffer and writes a static output: each call copies `x` in and
    returns a clone of the output. For latency at small batches, where launches dominate on a GPU.
    AOTInductor packages are refused: capturing one crashed the process (torch 2.11, H100)."""

    def __init__(self, runner: Runner) -> None:
        if runner.device.type != "cuda":
            raise VitfoldError(f"CUDA graphs need a CUDA runner, not {runner.device}")
        if runner.runtime == "aoti":
            raise VitfoldError("CUDA graphs: capturing an AOTInductor package crashed torch 2.11; not supported")
        super().__init__(str(runner.device))
        self.inner, self.runtime, self.provider = runner, runner.runtime, runner.provider
        self._graphs: dict[tuple[int, ...], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}

    def _capture(self, x: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        static_in = x.clone()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up outside the graph: lazy initialisation, allocator pools
            for _ in range(3):
                self.inner(static_in)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self.inner(static_in)
        return graph, static_in, static_out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        key = tuple(x.shape)
        if key not in self._graphs:
            self._graphs[key] = self._capture(x)
        graph, static_in, static_out = self._graphs[key]
        static_in.copy_(x)
        graph.replay()
        return static_out.clone()

    def close(self) -> None:
        self._graphs.clear()
        self.inner.close()


def unavailable(backend: str, device: str = "cpu") -> str | None:
    """Why runtime `backend` cannot run on `device` here (None when it can)."""
    if backend not in RUNTIMES:
        return f"unknown backend '{backend}' (choose from {', '.join(RUNTIMES)})"
    if device.startswith("cuda") and not torch.cuda.is_available():
        return "no CUDA GPU visible"
    if backend in MODULES and importlib.util.find_spec(MODULES[backend]) is None:
        return f"the {MODULES[backend]} package is not installed"
    if backend == "tensorrt" and not torch.cuda.is_available():
        return "TensorRT needs a CUDA GPU"
    if backend == "openvino" and device.startswith("cuda"):
        return "vitfold runs OpenVINO on the CPU (its GPU plugin is for Intel GPUs)"
    if backend == "onnxruntime" and device.startswith("cuda"):
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return f"this onnxruntime build has no CUDAExecutionProvider ({ort_gpu_fix()})"
    return None


def ort_gpu_fix() -> str:
    """How to get ONNX Runtime's CUDA provider here: the two distributions that own the import name
    `onnxruntime` (the CPU build, a base dependency, and onnxruntime-gpu) must not both be installed."""
    from importlib.metadata import distributions

    names = {"onnxruntime", "onnxruntime-gpu"}
    installed = sorted(f"{d.name} {d.version}" for d in distributions() if d.name.lower() in names)
    fix = "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu"
    if len(installed) == 2:
        return f"both {' and '.join(installed)} are installed and one overwrote the other: {fix}"
    return f"pip install 'vitfold[gpu]', then {fix} (the README's GPU install)"


def runtime_of(path: Path) -> str:
    """The runtime that opens an artifact file, by its suffix (`RUNTIME_OF_SUFFIX`)."""
    runtime = RUNTIME_OF_SUFFIX.get(path.suffix.lower())
    if runtime is None:
        known = ", ".join(RUNTIME_OF_SUFFIX)
        raise VitfoldError(f"{path}: no runtime opens a '{path.suffix}' file (known suffixes: {known})")
    return runtime


def open_runner(
    backend: str,
    path: str | Path | nn.Module,
    device: str = "cpu",
    threads: int | None = None,
    spin: bool | None = None,
    **io_names: str | None,
) -> Runner:
    """Open runtime `backend` on the artifact at `path` (for "torch": the nn.Module itself); `io_names`
    (input_name, output_name) choose an ONNX graph's input and output when it has several. A file the runtime
    cannot load is a one-line `VitfoldError`.

    A context manager; `runner(x)` takes an image batch on `runner.device` (`runner.to_device(x)`) and
    returns logits there. On CUDA, fp32 means fp32: TF32 is switched off in torch's matmuls too. `threads`
    (onnxruntime, openvino): the runtime's CPU threads; `spin` (onnxruntime): whether its idle threads spin."""
    reason = unavailable(backend, device)
    if reason:
        raise VitfoldError(f"backend {backend}: {reason}")
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    if backend == "torch":
        if not isinstance(path, nn.Module):
            raise VitfoldError("backend torch: pass the nn.Module itself")
        return TorchRunner(path, device)
    path = Path(path)
    if not path.is_file():
        raise VitfoldError(f"backend {backend}: {path} not found")
    if not path.stat().st_size:
        raise VitfoldError(f"{path} is empty: no {backend} artifact")
    try:
        if backend == "onnxruntime":
            return OnnxRuntimeRunner(path, device, threads, spin, **io_names)
        if backend == "openvino":
            from vitfold.export.openvino_runner import OpenVINORunner

            return OpenVINORunner(path, device, threads)
        return {"torchscript": TorchScriptRunner, "aoti": AOTIRunner, "tensorrt": TensorRTRunner}[backend](path, device)
    except VitfoldError:
        raise
    except Exception as e:  # a damaged or foreign file: the user's input, not a bug here
        raise VitfoldError(f"{path}: {backend} cannot load it ({type(e).__name__}: {first_line(e)})") from e


EXECUTABLE_RUNTIMES = ("torchscript", "aoti", "tensorrt")  # loading their files runs the code they hold


def open_hashed(
    backend: str,
    path: str | Path,
    check: Callable[[str], None],
    device: str = "cpu",
    threads: int | None = None,
    **io_names: str | None,
) -> Runner:
    """`open_runner` on what was hashed: the file is copied once into a private temporary folder (mode 0700),
    the copy is hashed, `check(sha256)` refuses it or not (trust store, a run's record), and the runtime
    loads the copy, which is removed once loaded. So a file swapped at `path` after the check never runs.
    Every runtime here reads its file whole when it opens (TorchScript, TensorRT) or unpacks it (AOTInductor)."""
    path = Path(path)
    reason = unavailable(backend, device)
    if reason:
        raise VitfoldError(f"backend {backend}: {reason}")
    if not path.is_file():
        raise VitfoldError(f"backend {backend}: {path} not found")
    with tempfile.TemporaryDirectory(prefix="vitfold-load-") as folder:
        copy = Path(folder) / path.name
        shutil.copyfile(path, copy)
        check(file_sha256(copy))
        return open_runner(backend, copy, device, threads, **io_names)
