#!/usr/bin/env bash
# The GPU checks of the issues, in one go on a CUDA machine (results under $OUT, default ./gpu-results):
# environment and onnxruntime providers, ViT-B/16 training throughput/memory per method (bf16, batch 64),
# and the whole pipeline on ViT-B/16 on CUDA (train, fold, export onnx + CUDA AOTI, verify, bench 1 & 64).
set -uo pipefail
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python - <<'PY' | tee "$OUT/env.json"
import json, torch, timm, onnxruntime as ort
print(json.dumps({"torch": torch.__version__, "timm": timm.__version__, "onnxruntime": ort.__version__,
                  "ort_providers": ort.get_available_providers(), "gpu": torch.cuda.get_device_name(),
                  "capability": torch.cuda.get_device_capability()}))
PY
python benchmarks/gpu_train.py --out "$OUT/gpu_train.json"
RUN=/tmp/vitb-cuda
python -m vitfold run --config benchmarks/configs/vitb_cuda.yaml --out "$RUN" 2>&1 | grep -v "it/s\]" | tail -80
cp -r "$RUN/verify" "$RUN/bench" "$RUN/REPORT.md" "$RUN/manifest.json" "$OUT/" 2>/dev/null
cp "$RUN/export/export.json" "$OUT/" 2>/dev/null
