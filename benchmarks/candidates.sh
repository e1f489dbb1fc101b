#!/usr/bin/env bash
# Training candidates against the untrained f and a PatchCore-equivalent bank, on the three real
# data sets over 3 seeds, on cached backbone features (benchmarks/sweep.py). Writes one Markdown table
# per data set to docs/results/candidates/. Heavy: run it alone.
#   bash benchmarks/candidates.sh [DATA ...]   (default: bottle kolektorsdd mpdd_metal_plate)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
for data in "${@:-bottle kolektorsdd mpdd_metal_plate}"; do
  for name in $data; do
    "$PY" benchmarks/sweep.py --data "configs/data/$name.yaml" --coreset-ratio 0.01 --seeds 0 1 2 \
      --out "docs/results/candidates/$name.md" \
      --setting num_steps=0,coreset=projected \
      --setting num_steps=0 \
      --setting defaults \
      --setting batch_sampling=neighbors \
      --setting sigma_unit=normalized \
      --setting sigma_unit=normalized,sigma=0.5 \
      --setting sigma_unit=normalized,sigma=0.1 \
      --setting learning_rate=1e-5
  done
done
