#!/usr/bin/env bash
# Image-row speed and memory on one GPU (docs/benchmarks.md, "Image rows"): the 11B architecture with random
# weights, batch 16, every row carrying one synthetic image of the given tile count; each setup in its own process.
# Results go to $OUT (default bench-images/). PROFILE=1 profiles the 4-tile setup. BASE=DIR then also measures the
# toolkit package found in DIR (an older checkout) on the 4-tile setup, for a same-machine comparison.
set -uo pipefail
OUT=${OUT:-bench-images}
mkdir -p "$OUT"
recipe=recipes/construction-images.yaml
common=(--random-weights --steps "${STEPS:-8}" --warmup "${WARMUP:-2}" --set train.batch_size=16)
quiet() { grep -v "Loading weights\|Writing model\|it/s\]$"; }
echo "== 4 tiles"
python -m toolkit bench "$recipe" "${common[@]}" --set bench.image_tiles=4 ${PROFILE:+--profile} \
  --json "$OUT/images-4-tiles.json" 2>&1 | quiet | tail -n 40
echo "== 1 tile (the recipe's setup), filled, 8-bit"
python -m toolkit bench "$recipe" "${common[@]}" --set bench.image_tiles=1 --json "$OUT/images-1-tile.json" \
  --compare "1 tile, filled: data.vision_tiles=filled" \
  --compare "8-bit, checkpointing: quantization.mode=8bit train.gradient_checkpointing=true" \
  --compare "8-bit: quantization.mode=8bit" 2>&1 | quiet | tail -n 14
if [ -n "${BASE:-}" ]; then
  echo "== 4 tiles, $BASE"
  # -P: import the toolkit from $BASE, not from the checkout in the working directory
  PYTHONPATH="$BASE:${PYTHONPATH:-}" python -P -m toolkit bench "$recipe" "${common[@]}" --set bench.image_tiles=4 \
    --json "$OUT/images-before.json" 2>&1 | quiet | tail -n 8
fi
