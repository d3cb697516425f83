#!/usr/bin/env bash
# Issue 24's GPU checks in one go on a CUDA machine (results under $OUT, default ./gpu-speed-results), each
# step under its own time limit so that one slow compile cannot take the session's device time:
#  1. the environment (onnxruntime's providers, whether TensorRT imports);
#  2. the training step of ViT-B/16 at batch 64, bf16: full fine-tuning, RLRR and EFFT2, eager and compiled
#     with CUDA graphs (reduce-overhead), AdamW fused (benchmarks/gpu_train.py; the goal: RLRR >= 0.9x full);
#  3. inference of a folded ViT-B/16 (random weights: speed does not depend on them) in fp16 and bf16, eager,
#     eager in a CUDA graph, and torch.compile max-autotune (tuned matmuls, CUDA graphs), at batch 1 and 256
#     (benchmarks/gpu_precision.py; the goals: >= 20,000 img/s at 256, <= 0.5 ms at 1, within the gates).
# Before a device session, `CPU_DRY_RUN=1 bash benchmarks/gpu_speed_checks.sh` runs every step on this CPU
# with a tiny model, to catch errors where they cost nothing.
set -uo pipefail
OUT=${OUT:-gpu-speed-results}
mkdir -p "$OUT"
source benchmarks/shim.sh  # vitfold importable from the source tree
if [ -n "${CPU_DRY_RUN:-}" ]; then
  DEVICE=cpu; BACKBONE=vit_tiny_patch16_224; TRAIN_BATCH=2; STEPS=2; BIG=2; MODE=default; LIMIT=600
else
  DEVICE=cuda; BACKBONE=vit_base_patch16_224; TRAIN_BATCH=64; STEPS=30; BIG=256; MODE=max-autotune; LIMIT=240
fi
python benchmarks/device_env.py | tee "$OUT/env.json"
time timeout $LIMIT python benchmarks/gpu_train.py --device $DEVICE --backbone $BACKBONE --batch-size $TRAIN_BATCH \
  --steps $STEPS --methods full,rlrr,efft2 --compile-modes eager,reduce-overhead --fused --out "$OUT/train.json" \
  2>&1 | grep -v "^W[0-9]" | tail -20
time timeout $((LIMIT + 120)) python benchmarks/gpu_precision.py --random-model $BACKBONE --device $DEVICE \
  --runtimes torch,compiled --compiled-precisions fp16,bf16 --compile-mode $MODE --check-batch 1 \
  --throughput-batch $BIG --out "$OUT/inference.json" 2>&1 | grep -v "^W[0-9]" | tail -20
