"""vitfold export side: exporters, runners, comparison, benchmarking, reports.

Optional runtimes (onnxruntime-gpu, tensorrt) are imported lazily inside the modules that need them,
so `import export` works without them.
"""
