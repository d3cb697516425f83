"""What a device machine has, as one JSON line: torch, timm, onnxruntime and its providers, the GPU, and
whether TensorRT and OpenVINO import (the device scripts record it beside their numbers)."""

from __future__ import annotations

import importlib.util
import json

import onnxruntime as ort
import timm
import torch

found = {
    "torch": torch.__version__,
    "timm": timm.__version__,
    "onnxruntime": ort.__version__,
    "ort_providers": ort.get_available_providers(),
    "tensorrt": importlib.util.find_spec("tensorrt") is not None,
    "openvino": importlib.util.find_spec("openvino") is not None,
}
if torch.cuda.is_available():
    found |= {"gpu": torch.cuda.get_device_name(), "capability": torch.cuda.get_device_capability()}
print(json.dumps(found))
