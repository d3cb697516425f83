#!/usr/bin/env bash
# Issue 13's Swin-B speed checks in one go (results under $OUT, default ./swin-results): folded vs unmerged
# inference and the training step (RLRR, EFFT2 vs full fine-tuning) on the CPU at batch 1 and 8, and on CUDA
# at batch 32 when a GPU is present. Runs on a machine without a vitfold install through benchmarks/shim.sh.
set -uo pipefail
OUT=${OUT:-swin-results}
mkdir -p "$OUT"
source benchmarks/shim.sh  # vitfold importable from the source tree
SWIN=swin_base_patch4_window7_224
for b in 1 8; do
  python benchmarks/train_step.py --backbone $SWIN --batch-size $b --rounds 5 --out "$OUT/swinb_cpu_b$b.json"
done
if python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  python benchmarks/train_step.py --backbone $SWIN --batch-size 32 --device cuda --iters 10 --rounds 7 \
    --out "$OUT/swinb_cuda_b32.json"
fi
