#!/usr/bin/env bash
# The GPU checks of the issues, in one go on a CUDA machine (results under $OUT, default ./gpu-results):
# environment and onnxruntime providers; ViT-B/16 pre-trained from scratch on digits, RLRR-adapted, folded,
# exported as CUDA AOTInductor packages in fp32 and fp16, verified and benched on CUDA (issue 14); then
# reduced-precision latency with and without CUDA graphs (benchmarks/gpu_precision.py).
# The machine's image has no vitfold install: benchmarks/shim.sh maps the source tree onto the package.
set -uo pipefail
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
source benchmarks/shim.sh  # vitfold importable from the source tree
python benchmarks/device_env.py | tee "$OUT/env.json"
RUN=/tmp/vitb-precision
REPO=$PWD
# from the shim's folder: `python -m` puts the working folder first on sys.path, and ./vitfold lacks the subpackages
(cd "$SHIM" && time python -m vitfold run --config "$REPO/benchmarks/configs/vitb_cuda_precision.yaml" --out "$RUN") \
  2>&1 | grep -v "it/s\]" | tail -60
cp -r "$RUN/verify" "$RUN/bench" "$RUN/REPORT.md" "$RUN/manifest.json" "$OUT/" 2>/dev/null
cp "$RUN/export/export.json" "$OUT/" 2>/dev/null
time python benchmarks/gpu_precision.py "$RUN" --out "$OUT/gpu_precision.json"
