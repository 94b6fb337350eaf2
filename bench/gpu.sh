#!/usr/bin/env bash
# The GPU run, under 8 minutes on one NVIDIA GPU (bench/gpu.py says what each step measures):
# torch FP32/BF16/FP16 autocast + channels_last at batch 64-256 with 16 mixed adapters; 1/16/64
# mixed adapters vs HF peft grouped per adapter; ONNX Runtime (CUDA EP when installed) vs torch;
# HTTP at concurrency 64/128/256. Writes research/bench/gpu.json and the "GPU figures" block of
# docs/benchmarks.md. Run from a set-up clone (README).
#   METALORA_GPU_DRYRUN=1 bash bench/gpu.sh   # the same steps on the CPU at tiny sizes (tests do this);
#                                              # its block is marked as a CPU dry run, never as GPU figures
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${METALORA_BIN:-.venv/bin}
JSON=${METALORA_GPU_JSON:-research/bench/gpu.json}
DOC=${METALORA_GPU_DOC:-docs/benchmarks.md}
if [[ -n "${METALORA_GPU_DRYRUN:-}" ]]; then
  ARGS=(--device cpu --tiny)
else
  "$BIN/python" -c 'import torch, sys; ok = torch.cuda.is_available(); print("cuda:", torch.cuda.get_device_name(0) if ok else "none"); sys.exit(0 if ok else 1)' \
    || { echo "no CUDA device visible to torch; nothing measured (METALORA_GPU_DRYRUN=1 runs the steps on the CPU)" >&2; exit 1; }
  ARGS=(--device cuda)
  "$BIN/python" -c 'import onnxruntime as o; print("onnxruntime providers:", o.get_available_providers())' || true
fi
mkdir -p "$(dirname "$JSON")"
timeout 470 "$BIN/python" -m bench.gpu "${ARGS[@]}" --json "$JSON" --doc "$DOC"
