#!/usr/bin/env bash
# Both benchmarks behind experiments/results/sparsegpt.md (PPL on all 247 test windows; run under the big-job lock):
#   OMP_NUM_THREADS=1 flock /tmp/prune_lab_big.lock bash experiments/run_sparsegpt_benchmarks.sh
# compare_llmcompressor.py (prune_lab vs llm-compressor back to back per pair) and bench_sparsegpt.py (every
# prune_lab setting through the real CLI) can also run separately; --render rewrites the table from both.
set -e
cd "$(dirname "$0")/.."
PY=${PY:-/work/main/.venv/bin/python}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
$PY experiments/compare_llmcompressor.py
$PY experiments/bench_sparsegpt.py --core
$PY experiments/bench_sparsegpt.py --render
