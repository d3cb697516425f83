"""vitfold export side: exporters, runners, comparison, benchmarking, reports.

Optional runtimes (onnxruntime-gpu, tensorrt) are imported lazily inside the modules that need them,
so `import export` works without them.
"""

FORMATS = ("onnx", "torchscript", "aoti", "tensorrt")
DEFAULT_FORMATS = ("onnx", "torchscript", "aoti")  # tensorrt needs the [trt] extra and a GPU
