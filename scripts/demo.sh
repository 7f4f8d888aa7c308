#!/usr/bin/env bash
# Set up the environment, then erase a concept end to end: erase -> sample before/after -> export.
# Until the embedded digits model ships (issue 3), this runs on builtin:tiny, a random-weight model
# of SD's exact structure: every code path is real, the pictures are noise.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
OUT=${1:-runs/demo}
MODEL=${MODEL:-builtin:tiny}
concept-erase erase --config pipelines/demo-tiny.yaml --model "$MODEL" --output "$OUT/run" --overwrite
concept-erase sample --model "$MODEL" --prompt "a painting by van gogh" --prompt "a photo of a dog" \
  --seeds 0-3 --steps 20 --output "$OUT/before" --overwrite
concept-erase sample --model "$MODEL" --weights "$OUT/run/erased.safetensors" \
  --prompt "a painting by van gogh" --prompt "a photo of a dog" --seeds 0-3 --steps 20 --output "$OUT/after" --overwrite
concept-erase export "$OUT/run" --format diffusers --output "$OUT/pipeline" --overwrite
echo "done: $OUT (run/metrics.jsonl, before/grid.png, after/grid.png, pipeline/)"
