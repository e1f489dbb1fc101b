#!/usr/bin/env bash
# The two image scores, the anomaly map's largest pixel (image_score=map, the default) and PatchCore's
# re-weighted patch (image_score=patches), for the trained and the untrained f, on each real data set
# over seeds 0 1 2 on cached backbone features (benchmarks/sweep.py), at the models' default coreset
# ratio 0.1 (RATIO=0.01 for the README's). The same seed trains the same f under both scores, so each pair of rows differs
# only in the score, and each trained row differs from its untrained one only in f; the
# PatchCore-equivalent bank (anomalib's random projection, identity f) is scored both ways too.
# kolektorsdd_640x256 is KolektorSDD at its own 640x256 aspect; NAME_128 is NAME at 128 px, where
# defects cover a quarter of the patches they cover at 256 px, so the map's blur weighs on small
# ones. Writes docs/results/image_score/coresetRATIO/NAME.md.
# Heavy: run it alone.
#   [RATIO=0.1] bash benchmarks/image_score.sh [NAME ...]   (default: bottle kolektorsdd mpdd_metal_plate)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
RATIO=${RATIO:-0.1}
for name in ${@:-bottle kolektorsdd mpdd_metal_plate}; do
  case $name in
    kolektorsdd_640x256) data=kolektorsdd; size=(640 256) ;;
    *_128) data=${name%_128}; size=(128) ;;
    *) data=$name; size=(256) ;;
  esac
  "$PY" benchmarks/sweep.py --data "configs/data/$data.yaml" --image-size "${size[@]}" --coreset-ratio "$RATIO" \
    --seeds 0 1 2 --out "docs/results/image_score/coreset$RATIO/$name.md" \
    --setting image_score=patches --setting image_score=map --setting num_steps=0,image_score=patches \
    --setting num_steps=0,image_score=map --setting num_steps=0,coreset=projected,image_score=patches \
    --setting num_steps=0,coreset=projected,image_score=map
done
