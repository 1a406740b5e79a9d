#!/usr/bin/env bash
# The whole image path at full size on one GPU: sft -> eval -> generate --image -> merge, on the Llama 3.2 11B Vision
# architecture with random weights (the checkpoint `toolkit bench --random-weights` builds), for
# recipes/construction-images.yaml (bf16) and recipes/construction-images-8bit.yaml. Short runs: the point is that
# every command works at full size on this GPU's image processor, not what random weights learn. RECIPES="a b"
# picks recipes by name; CHECKPOINT=a model folder instead of the random 11B, SFT_SET="--set k=v ..." more for sft
# (a CPU smoke run: CHECKPOINT=builtin:tiny-mllama SFT_SET="--set train.liger_kernel=false --set quantization.mode=none").
set -uo pipefail
work=${WORK:-/tmp/image-path}
mkdir -p "$work"
checkpoint=${CHECKPOINT:-}
[ -n "$checkpoint" ] || checkpoint=$(python -c "from toolkit.bench.harness import random_weights_checkpoint as r; print(r())" | tail -n 1)
quiet() { grep -v "Loading weights\|Writing model\|it/s\]$"; }
for recipe in ${RECIPES:-construction-images construction-images-8bit}; do
  run="$work/$recipe"
  echo "== $recipe"
  python -m toolkit sft "recipes/$recipe.yaml" --set model.name="$checkpoint" --set train.max_steps="${STEPS:-4}" \
    --set train.save_steps=100 --set train.logging_steps=1 ${SFT_SET:-} --output-dir "$run" 2>&1 | quiet | tail -n 12
  echo "sft exit ${PIPESTATUS[0]}"
  python -m toolkit eval "$run" --data data/construction_images/eval.jsonl --limit 4 --max-new-tokens 8 2>&1 | quiet | tail -n 8
  echo "eval exit ${PIPESTATUS[0]}"
  python -m toolkit generate "$run" "이 도면 기호가 나타내는 것은?" --image data/construction_images/door_eval.png \
    --max-new-tokens 8 2>&1 | quiet | tail -n 3
  echo "generate exit ${PIPESTATUS[0]}"
  python -m toolkit merge "$run" --output "$work/$recipe-merged" 2>&1 | quiet | tail -n 8
  echo "merge exit ${PIPESTATUS[0]}"
  rm -rf "$work/$recipe-merged"  # 21 GB
done
