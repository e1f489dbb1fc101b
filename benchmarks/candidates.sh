#!/usr/bin/env bash
# Training candidates against the untrained f and a PatchCore-equivalent bank, on the three real
# data sets over 3 seeds, on cached backbone features (benchmarks/sweep.py). Writes one Markdown table
# per data set to docs/results/SET/. Heavy: run it alone.
#   bash benchmarks/candidates.sh [SET] [DATA ...]
# SET: candidates (the default), recipe or length, as benchmarks/candidate_settings.sh lists them.
# DATA: configs/data names (default: bottle kolektorsdd mpdd_metal_plate).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
set_name=candidates
if [[ "${1:-}" == candidates || "${1:-}" == recipe || "${1:-}" == length ]]; then set_name=$1; shift; fi
source benchmarks/candidate_settings.sh
case $set_name in
  candidates) settings=("${CANDIDATES[@]}") ;;
  recipe) settings=("${RECIPE[@]}") ;;
  length) settings=("${LENGTH[@]}") ;;
esac
for name in ${@:-bottle kolektorsdd mpdd_metal_plate}; do
  "$PY" benchmarks/sweep.py --data "configs/data/$name.yaml" --coreset-ratio 0.01 --seeds 0 1 2 \
    --out "docs/results/$set_name/$name.md" "${BASELINES[@]}" "${settings[@]}"
done
