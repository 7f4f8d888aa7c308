#!/usr/bin/env bash
# Set up the environment, then run the demo on the embedded digits model: erase one digit with
# EUPMU, export the erased weights, and judge generations before and after (report + image grid).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
OUT=${1:-runs/demo}
concept-erase demo --output "$OUT" --digit "${DIGIT:-three}" --overwrite
concept-erase export "$OUT/run" --format diffusers --output "$OUT/pipeline" --overwrite
echo "done: $OUT/report.md, $OUT/grid.png, $OUT/grid-styles.png, erased weights $OUT/run/erased.safetensors, pipeline $OUT/pipeline/"
