#!/usr/bin/env bash
# The evaluation protocol behind any change of default: every real data set (KolektorSDD at 256 px and
# at its own 640x256 aspect), coreset ratios 0.01 and 0.1, seeds 0 1 2. For each combination it writes
#   docs/results/protocol/NAME/coresetR/compare/  `reconpatch compare` of ReConPatch (defaults), stock
#                                                  Patchcore and ReConPatchEnsemble: mean ± sd per model
#                                                  (report.md, report.json, roc.png; the runs and
#                                                  heatmaps.png, which shows the data sets' images, stay in
#                                                  results/protocol/)
#   docs/results/protocol/NAME/coresetR/candidates.md  every setting of candidate_settings.sh (baselines,
#                                                  candidates, recipe) on cached features (benchmarks/sweep.py)
# Many hours on 2 cores: run it alone. Stopped, it goes on from the compare's last finished run when
# started again (reconpatch compare reuses finished runs). Narrow it with the environment, e.g.
#   DATA="bottle" RATIOS="0.1" SEEDS="0 1 2" bash benchmarks/protocol.sh
# and PARTS="compare" (or "candidates") runs one of the two parts.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
SEEDS=${SEEDS:-0 1 2}
RATIOS=${RATIOS:-0.01 0.1}
PARTS=${PARTS:-compare candidates}
# Data config names; kolektorsdd_640x256 is kolektorsdd at 640 x 256 px (height x width), the rest at 256 px.
RUNS=${DATA:-bottle kolektorsdd kolektorsdd_640x256 mpdd_metal_plate}
source benchmarks/candidate_settings.sh
for name in $RUNS; do
  case $name in
    kolektorsdd_640x256) data=kolektorsdd; size=(640 256) ;;
    *) data=$name; size=(256) ;;
  esac
  for ratio in $RATIOS; do
    # docs/ names KolektorSDD ksdd, as the README's results do
    out=docs/results/protocol/${name/kolektorsdd/ksdd}/coreset$ratio
    work=results/protocol/$name/coreset$ratio/compare
    if [[ " $PARTS " == *" compare "* ]]; then
      mkdir -p "$out/compare"
      # shellcheck disable=SC2086
      "$BIN/reconpatch" compare --data "configs/data/$data.yaml" --image-size "${size[@]}" --coreset-ratio "$ratio" \
        --models ReConPatch Patchcore ReConPatchEnsemble --seed $SEEDS --out "$work"
      cp "$work/report.json" "$work/roc.png" "$out/compare/"
      # heatmaps.png stays behind, so its link goes too
      sed '/^!\[heatmaps\](heatmaps.png)$/d' "$work/report.md" >"$out/compare/report.md"
    fi
    if [[ " $PARTS " == *" candidates "* ]]; then
      mkdir -p "$out"
      # shellcheck disable=SC2086
      "$BIN/python" benchmarks/sweep.py --data "configs/data/$data.yaml" --image-size "${size[@]}" \
        --coreset-ratio "$ratio" --seeds $SEEDS --out "$out/candidates.md" "${BASELINES[@]}" "${CANDIDATES[@]}" "${RECIPE[@]}" "${LENGTH[@]}"
    fi
  done
done
