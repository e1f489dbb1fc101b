#!/usr/bin/env bash
# The README's results table: ReConPatch against stock PatchCore on each real data set in ../shared/data,
# tf_efficientnet_lite0 (blocks.2, blocks.4), 256 px, coreset ratio 0.01, seeds 0, 1 and 2, one
# `reconpatch compare` per data set. Writes results/compare/<data>/ and copies report.md, report.json
# and roc.png into docs/results/<folder>/. heatmaps.png stays in results/: it shows the data sets' images,
# which are licensed for non-commercial use and never go into the repository.
# Arguments: CONFIG:FOLDER pairs (default: all three). Run it alone on the machine: peak memory and times are measured, and other jobs distort them.
set -euo pipefail
cd "$(dirname "$0")/.."
RECONPATCH=${RECONPATCH:-.venv/bin/reconpatch}
# CONFIG:FOLDER pairs; KolektorSDD's folder is ksdd, since a folder named after a data set's own folders
# (mvtec_ad, kolektor...) would pass for a copy of the data.
pairs=("$@")
[ ${#pairs[@]} -gt 0 ] || pairs=(bottle:bottle kolektorsdd:ksdd mpdd_metal_plate:mpdd_metal_plate)
for pair in "${pairs[@]}"; do
  name=${pair%%:*}
  folder=${pair#*:}
  "$RECONPATCH" compare --data "configs/data/$name.yaml" --coreset-ratio 0.01 --seed 0 1 2 --out "results/compare/$name"
  mkdir -p "docs/results/$folder"
  cp "results/compare/$name/report.md" "results/compare/$name/report.json" "results/compare/$name/roc.png" "docs/results/$folder/"
done
