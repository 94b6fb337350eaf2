#!/usr/bin/env bash
# Issue 12's whole experiment, every stage in order; resumable: run it again after an interruption
# and it skips every finished run (research/paper/raw/**.json) and resumes an unfinished one from
# its last epoch (runs/paper/ckpt/). Log: append it to a file, e.g.
#   nohup bash research/run_paper.sh >> runs/paper.log 2>&1 &
# Then `python -m research.make_paper` writes the tables and charts (any time: it says what is missing).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PY:-.venv/bin/python}"
# The budget-matched frozen-seed row is LoRA rank 16 exactly (tests/test_seed_mode.py), so it runs
# last; the same-ranks row (MetaLoRA-TR's own branch, mapping network off) is the informative control.
ROWS=(frozen lora multi-lora metalora-cp metalora-tr metalora-tr-frozen-seed-same-ranks)
"$PY" -m research.run_paper --stage lr --rows "${ROWS[@]}" --compute-features
"$PY" -m research.run_paper --stage main --rows "${ROWS[@]}" --seeds 0 1 2
"$PY" -m research.run_paper --stage sweep
"$PY" -m research.run_paper --stage budget2 --rows "${ROWS[@]}" --seeds 0 1 2
# It trains at LoRA's rate: with the seed frozen it is LoRA rank 16 (same function, same init), so
# LoRA's search is its search. Its own search runs after, as a check that it picks the same rate.
"$PY" -m research.run_paper --stage main --rows metalora-tr-frozen-seed --seeds 0 1 2 --lr metalora-tr-frozen-seed=0.01
"$PY" -m research.run_paper --stage budget2 --rows metalora-tr-frozen-seed --seeds 0 1 2 --lr metalora-tr-frozen-seed=0.01
"$PY" -m research.run_paper --stage lr --rows metalora-tr-frozen-seed
