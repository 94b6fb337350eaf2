#!/usr/bin/env bash
# Sections (b) heterogeneous batching vs peft and (c) HTTP serving, on CUDA, in under 8 minutes.
# Writes results/bench/gpu.json, docs/benchmarks-gpu.md and its plots under docs/benchmarks-gpu/.
# Run from a set-up clone (README) on a machine with an NVIDIA GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${METALORA_BIN:-.venv/bin}
"$BIN/python" -c 'import torch, sys; ok = torch.cuda.is_available(); print("cuda:", torch.cuda.get_device_name(0) if ok else "none"); sys.exit(0 if ok else 1)' \
  || { echo "no CUDA device visible to torch; nothing measured" >&2; exit 1; }
mkdir -p results/bench
timeout 470 "$BIN/metalora" bench --sections bc --device cuda --rounds 5 \
  --json results/bench/gpu.json --plots docs/benchmarks-gpu --doc docs/benchmarks-gpu.md
