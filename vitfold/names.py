"""Every list of names vitfold accepts, in one place and importing nothing, so that the CLI's `--help` reads
them without torch: adapter methods, official codes, stages, and the backends verify and bench compare. The
registries are checked against these (tests/cli/test_cli_guidance.py). A new backend is one entry of
`ARTIFACT_BACKENDS` (and its runner)."""

METHODS = ("rlrr", "efft1", "efft2", "lora", "linear", "full")
OFFICIAL_METHODS = ("rlrr", "efft2")  # the official codes import-official reads
STAGES = ("pretrain", "train", "compare", "fold", "export", "verify", "bench", "report")
DROP_PATH_MODES = ("sample", "elementwise", "official")  # vitfold.pipeline.drop_path

UNMERGED, FOLDED, BASE = "torch-unmerged", "torch-folded", "torch-base"
FOLDED_FP16, FOLDED_BF16 = "torch-folded-fp16", "torch-folded-bf16"
TORCH_BACKENDS = (UNMERGED, FOLDED, BASE, FOLDED_FP16, FOLDED_BF16)
# backend -> (runtime, the export artifact it opens, a key of vitfold.export.FILES)
ARTIFACT_BACKENDS = {
    "torchscript": ("torchscript", "torchscript"),
    "onnxruntime": ("onnxruntime", "onnx"),
    "onnxruntime-fp16": ("onnxruntime", "onnx-fp16"),
    "onnxruntime-int8": ("onnxruntime", "onnx-int8"),
    "aoti": ("aoti", "aoti"),
    "aoti-fp16": ("aoti", "aoti-fp16"),
    "aoti-bf16": ("aoti", "aoti-bf16"),
    "tensorrt": ("tensorrt", "tensorrt"),
    "openvino": ("openvino", "openvino"),
    "openvino-bf16": ("openvino", "openvino-bf16"),
    "openvino-int8": ("openvino", "openvino-int8"),
}
BACKENDS = (*TORCH_BACKENDS, *ARTIFACT_BACKENDS)
