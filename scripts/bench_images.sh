#!/usr/bin/env bash
# Image-row speed and memory on one GPU (docs/benchmarks.md, "Image rows"): the 11B architecture with random
# weights, every row carrying one synthetic image of the given tile count. Results go to $OUT (default
# bench-images/); each setup runs in its own process. BASE=DIR also measures the toolkit package found in DIR
# (e.g. an older checkout) on the 4-tile setup, for a same-machine comparison.
set -uo pipefail
OUT=${OUT:-bench-images}
mkdir -p "$OUT"
recipe=recipes/construction-images.yaml
common=(--random-weights --steps "${STEPS:-8}" --warmup "${WARMUP:-2}" --set train.batch_size=16)
if [ -n "${BASE:-}" ]; then
  PYTHONPATH="$BASE:${PYTHONPATH:-}" python -m toolkit bench "$recipe" "${common[@]}" --json "$OUT/images-before.json" \
    --compare "4 tiles (before): bench.image_tiles=4" 2>&1 | tail -n 12
fi
python -m toolkit bench "$recipe" "${common[@]}" ${PROFILE:+--profile} --json "$OUT/images.json" \
  --compare "4 tiles: bench.image_tiles=4" \
  --compare "1 tile: bench.image_tiles=1" \
  --compare "1 tile, filled: bench.image_tiles=1 data.vision_tiles=filled" \
  --compare "8-bit, 1 tile, checkpointing: quantization.mode=8bit bench.image_tiles=1 train.gradient_checkpointing=true" \
  --compare "8-bit, 1 tile: quantization.mode=8bit bench.image_tiles=1"
