"""vitfold export side: exporters, runners, comparison, benchmarking, reports.

Optional runtimes (onnxruntime-gpu, tensorrt) are imported lazily inside the modules that need them,
so `import export` works without them.
"""

FORMATS = ("onnx", "torchscript", "aoti", "tensorrt")
DEFAULT_FORMATS = ("onnx", "torchscript", "aoti")  # tensorrt needs the [trt] extra and a GPU
# the file each format writes in RUN/export/ ("onnx-fp16": the --precision fp16 ONNX)
FILES = {"onnx": "model.onnx", "onnx-fp16": "model.fp16.onnx", "torchscript": "model.pt", "aoti": "model.pt2",
         "tensorrt": "model.plan"}  # fmt: skip
