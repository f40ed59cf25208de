#!/usr/bin/env bash
# Both benchmarks behind experiments/results/sparsegpt.md, in priority order (run under the heavy-job lock):
#   flock /tmp/prune_lab_heavy.lock bash experiments/run_sparsegpt_benchmarks.sh [N_OURS] [N_LLMC] [OUT]
set -e
cd "$(dirname "$0")/.."
PY=${PY:-/work/main/.venv/bin/python}
OUT=${3:-experiments/results/sparsegpt.md}
HF_HUB_OFFLINE=1 $PY experiments/bench_sparsegpt.py --core ${1:+--first $1} --out "$OUT"
HF_HUB_OFFLINE=1 $PY experiments/compare_llmcompressor.py ${2:+--first $2}
HF_HUB_OFFLINE=1 $PY experiments/bench_sparsegpt.py --render --out "$OUT"
