"""A real TensorRT engine from a tiny ViT's ONNX, run on the GPU against the PyTorch model.
Needs the [trt] extra and a CUDA GPU; skipped, saying why, elsewhere."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from vitfold.export.onnx import export_onnx

TINY = {"img_size": 16, "patch_size": 4, "depth": 2}


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_tensorrt_engine_matches_onnx(tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (extra [trt])")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU; none is visible")
    import tensorrt as trt

    from vitfold.export.tensorrt import build_engine

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=4, **TINY).eval()
    src = tmp_path / "model.onnx"
    export_onnx(model, src, (16, 16))
    plan = build_engine(src, tmp_path / "model.plan", precision="fp32", batch=(1, 2, 4))
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan.read_bytes())
    context = engine.create_execution_context()
    x = torch.randn(3, 3, 16, 16, device="cuda")
    out = torch.empty(3, 4, device="cuda")
    context.set_input_shape("input", tuple(x.shape))
    context.set_tensor_address("input", x.data_ptr())
    context.set_tensor_address("logits", out.data_ptr())
    context.execute_async_v3(torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    with torch.no_grad():
        ref = model.cuda()(x)
    assert float((out - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
    assert np.isfinite(out.cpu().numpy()).all()
