#!/usr/bin/env bash
# One GPU run measuring offloaded and partial checkpointing and regional compilation against today's setups.
#
#   OUT=/some/folder bash scripts/gpu_round3.sh
#
# Needs: one CUDA GPU with 80 GB or more, the toolkit's GPU dependencies importable (trl, peft, bitsandbytes,
# liger-kernel, datasets, pydantic; by default from /tmp/site, see ../shared/device/README.md), about 25 GB of disk
# under TOOLKIT_CACHE (default /tmp/toolkit-cache) for the random-weight 11B checkpoint `toolkit bench
# --random-weights` builds on first use. Every setup runs in its own process (`toolkit bench`'s default); the whole
# bench stops at BUDGET_S seconds (default 480), so the script ends within about 8.6 minutes: setups are ordered by
# importance, and any not reached are listed as skipped. Writes $OUT/round3.json (the bench's JSON),
# $OUT/summary.json and $OUT/bench.log, and prints a short table last.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder the results go to}"
mkdir -p "$OUT"
export PYTHONPATH="${SITE:-/tmp/site}:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOOLKIT_CACHE="${TOOLKIT_CACHE:-/tmp/toolkit-cache}"
export COLUMNS=220  # rich tables in the log, unwrapped
BUDGET_S="${BUDGET_S:-480}"
# A CPU smoke run of this very script (the built-in model, no GPU): RECIPE=a tiny recipe,
# MODEL_ARGS="--lengths 20:40 --set train.liger_kernel=false", STEPS="--steps 1 --warmup 1", REQUIRE_GPU=0.
RECIPE="${RECIPE:-recipes/construction.yaml}"
MODEL_ARGS="${MODEL_ARGS:---random-weights}"
STEPS="${STEPS:---steps 7 --warmup 3}"
export REQUIRE_GPU="${REQUIRE_GPU:-1}"

python3 - <<'EOF'
import importlib.util, os, sys
gpu = os.environ["REQUIRE_GPU"] == "1"
needed = ("torch", "transformers", "trl", "peft", "bitsandbytes", "datasets", "pydantic") + (("liger_kernel",) if gpu else ())
missing = [m for m in needed if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing packages: {', '.join(missing)} (install the wheels into /tmp/site or set SITE)")
import torch
if gpu and not torch.cuda.is_available():
    sys.exit("no CUDA GPU visible")
import transformers, trl, peft, bitsandbytes
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
print(f"{name}: torch {torch.__version__}, transformers {transformers.__version__}, "
      f"trl {trl.__version__}, peft {peft.__version__}, bitsandbytes {bitsandbytes.__version__}")
EOF

B4="quantization.mode=4bit train.batch_size=64"
BF="quantization.mode=none"
OFF="train.gradient_checkpointing=offload"
# 3 warm-up + 7 measured steps by default; the 4-bit and 8-bit pairs run 3 + 17, so that their first 20 losses
# (warm-up steps included: same batches, same order) can be compared. bf16 pairs compare their first 10.
LONG="bench.steps=17"
FLEX="train.padding_free=true model.attn_implementation=flex_attention bench.timeout=150"
VARLEN="train.padding_free=true model.attn_implementation=varlen"
PAD="train.padding_free=false"  # recipes/construction.yaml trains padding-free since; these setups measure padding

SETUPS=(
  "4bit-b64-ckpt: $B4 $LONG $PAD"
  "4bit-b64-offload: $B4 $OFF $LONG $PAD"
  "8bit-b48-ckpt (construction.yaml): $LONG $PAD"
  "8bit-b48-offload: $OFF $LONG $PAD"
  "bf16-b64-ckpt: $BF train.batch_size=64 $PAD"
  "bf16-b64-offload-auto40: $BF train.batch_size=64 $OFF train.checkpoint_layers=auto train.memory_budget_gib=40 $PAD"
  "construction-bf16: $BF train.batch_size=32 train.gradient_checkpointing=false $PAD"
  "8bit-b96-offload: train.batch_size=96 $OFF bench.profile=1 $PAD"
  "construction-bf16-noliger: $BF train.batch_size=32 train.gradient_checkpointing=false train.liger_kernel=false $PAD"
  "construction-bf16-compile: $BF train.batch_size=32 train.gradient_checkpointing=false train.liger_kernel=false train.compile=true bench.timeout=120 $PAD"
  "4bit-b128-offload: quantization.mode=4bit train.batch_size=128 $OFF $PAD"
  "bf16-b96-offload: $BF train.batch_size=96 $OFF $PAD"
  "8bit-b128-offload: train.batch_size=128 $OFF $PAD"
  "4bit-b96-offload: quantization.mode=4bit train.batch_size=96 $OFF $PAD"
  "bf16-b64-offload: $BF train.batch_size=64 $OFF $PAD"
  "bf16-b48-offload: $BF train.batch_size=48 $OFF $PAD"
  "4bit-b64-offload-auto16: $B4 $OFF train.checkpoint_layers=auto train.memory_budget_gib=16 $PAD"
  "bf16-b64-ckpt-packed: $BF train.batch_size=64 train.padding_free=true model.attn_implementation=sdpa"
  "bf16-b64-ckpt-packed-flex: $BF train.batch_size=64 train.padding_free=true model.attn_implementation=flex_attention bench.timeout=150"
  "4bit-b96-offload-packed-flex: quantization.mode=4bit train.batch_size=96 $OFF train.padding_free=true model.attn_implementation=flex_attention bench.timeout=150"
  "4bit-b128-offload-packed-flex: quantization.mode=4bit train.batch_size=128 $OFF $FLEX"
  "8bit-b96-offload-packed-flex: train.batch_size=96 $OFF $FLEX"
  "bf16-b96-offload-packed-flex: $BF train.batch_size=96 $OFF $FLEX"
  "construction-bf16-packed-flex: $BF train.batch_size=32 train.gradient_checkpointing=false $FLEX"
  "8bit-b48-ckpt-packed-flex: $LONG model.attn_implementation=flex_attention bench.timeout=150"
  "8bit-b48-ckpt-packed (construction.yaml as shipped, attention auto = varlen on a GPU): $LONG"
  "4bit-b96-offload-packed-varlen: quantization.mode=4bit train.batch_size=96 $OFF $VARLEN"
  "bf16-b96-offload-packed-varlen: $BF train.batch_size=96 $OFF $VARLEN"
  "8bit-b96-offload-packed-varlen: train.batch_size=96 $OFF $VARLEN"
  "construction-bf16-packed-varlen: $BF train.batch_size=32 train.gradient_checkpointing=false $VARLEN"
  "4bit-b96-offload-packed-varlen-long: quantization.mode=4bit train.batch_size=96 $OFF $VARLEN $LONG"
  "4bit-b96-offload-packed-varlen-fp8all: quantization.mode=4bit train.batch_size=96 $OFF $VARLEN $LONG train.fp8_matmuls=all"
  "bf16-b96-offload-packed-varlen-fp8all: $BF train.batch_size=96 $OFF $VARLEN train.fp8_matmuls=all"
  "4bit-b96-offload-packed-varlen-fp8fwd: quantization.mode=4bit train.batch_size=96 $OFF $VARLEN $LONG train.fp8_matmuls=forward"
  "8bit-b48-ckpt-packed-fp8all: $LONG train.fp8_matmuls=all"
  "bf16-b96-offload-auto40-packed-varlen-fp8all: $BF train.batch_size=96 $OFF train.checkpoint_layers=auto train.memory_budget_gib=40 $VARLEN train.fp8_matmuls=all"
  "bf16-b128-offload-auto40-packed-varlen-fp8all: $BF train.batch_size=128 $OFF train.checkpoint_layers=auto train.memory_budget_gib=40 $VARLEN train.fp8_matmuls=all"
  "bf16-b160-offload-auto40-packed-varlen-fp8all: $BF train.batch_size=160 $OFF train.checkpoint_layers=auto train.memory_budget_gib=40 $VARLEN train.fp8_matmuls=all"
  "bf16-b128-offload-packed-varlen-fp8all: $BF train.batch_size=128 $OFF $VARLEN train.fp8_matmuls=all"
  "bf16-b96-offload-auto40-packed-varlen: $BF train.batch_size=96 $OFF train.checkpoint_layers=auto train.memory_budget_gib=40 $VARLEN"
)
# ONLY="name1 name2" runs just those setups (their names before the colon), in the order above: a later GPU call
# can finish what an earlier one's time limit skipped.
COMPARE=()
for setup in "${SETUPS[@]}"; do
  name="${setup%%:*}"; name="${name%% *}"
  if [[ -z "${ONLY:-}" || " $ONLY " == *" $name "* ]]; then COMPARE+=(--compare "$setup"); fi
done
echo "toolkit bench: up to $BUDGET_S s; progress in $OUT/bench.log"
set +e
# shellcheck disable=SC2086  # MODEL_ARGS and STEPS are word lists
python3 -m toolkit bench "$RECIPE" $MODEL_ARGS --no-recipe $STEPS \
  --time-limit "$BUDGET_S" --setup-timeout 150 --json "$OUT/round3.json" "${COMPARE[@]}" \
  > "$OUT/bench.log" 2>&1
code=$?
set -e
echo "toolkit bench exited with $code (1: some setup failed or was skipped; see the table)"
grep -E "failed|Error|error" "$OUT/bench.log" | grep -v "^│" | tail -n 15 || true

python3 - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
results = json.loads((out / "round3.json").read_text())["results"]
by = {r["setup"].split(" ")[0]: r for r in results}
# new path -> today's path on the same batches (same batch size, same rows, same order)
PAIRS = {"4bit-b64-offload": "4bit-b64-ckpt", "8bit-b48-offload": "8bit-b48-ckpt",
         "bf16-b64-offload-auto40": "bf16-b64-ckpt", "construction-bf16-compile": "construction-bf16-noliger",
         "bf16-b64-offload": "bf16-b64-ckpt", "4bit-b64-offload-auto16": "4bit-b64-ckpt",
         "bf16-b64-ckpt-packed": "bf16-b64-ckpt", "bf16-b64-ckpt-packed-flex": "bf16-b64-ckpt",
         "4bit-b96-offload-packed-flex": "4bit-b96-offload", "4bit-b128-offload-packed-flex": "4bit-b128-offload",
         "8bit-b96-offload-packed-flex": "8bit-b96-offload", "bf16-b96-offload-packed-flex": "bf16-b96-offload",
         "construction-bf16-packed-flex": "construction-bf16", "8bit-b48-ckpt-packed-flex": "8bit-b48-ckpt",
         "8bit-b48-ckpt-packed": "8bit-b48-ckpt", "4bit-b96-offload-packed-varlen": "4bit-b96-offload-packed-flex",
         "bf16-b96-offload-packed-varlen": "bf16-b96-offload-packed-flex",
         "8bit-b96-offload-packed-varlen": "8bit-b96-offload-packed-flex",
         "construction-bf16-packed-varlen": "construction-bf16",
         "4bit-b96-offload-packed-varlen-fp8fwd": "4bit-b96-offload-packed-varlen-long",
         "4bit-b96-offload-packed-varlen-fp8all": "4bit-b96-offload-packed-varlen-long",
         "bf16-b96-offload-packed-varlen-fp8all": "bf16-b96-offload-packed-varlen",
         "8bit-b48-ckpt-packed-fp8all": "8bit-b48-ckpt-packed",
         "bf16-b96-offload-auto40-packed-varlen-fp8all": "bf16-b96-offload-auto40-packed-varlen"}

def loss_gap(new, old):
    same = ("batch", "measured_steps", "warmup_steps", "warmup_lengths")
    if any(new.get(k) != old.get(k) for k in same):  # then the two did not train the same batches
        return None, 0
    a, b = new.get("micro_losses") or [], old.get("micro_losses") or []
    n = min(len(a), len(b), 20)
    if not n:
        return None, 0
    return max(abs(x - y) / abs(y) for x, y in zip(a[:n], b[:n])), n

rows, summary = [], []
for r in results:
    key = r["setup"].split(" ")[0]
    entry = {"setup": r["setup"], "error": r.get("error")}
    if "error" not in r:
        entry.update({k: r.get(k) for k in ("quantization", "batch", "checkpointing", "checkpointed_layers", "text_layers",
                                            "attention",
                                            "real_tok_s", "median_step_s", "peak_gib", "predicted_peak_gib",
                                            "host_pinned_gib", "predicted_host_gib", "host_buffer_allocations",
                                            "prefetched_share")})
        entry["warmup_s"] = sum(r.get("warmup_step_s") or [])
        # the slowest measured step and what happened in it: its padded length, new pinned host blocks, new device
        # segments, allocation retries, garbage-collection seconds (counters cover warm-up steps first)
        w = r.get("warmup_steps", 0)
        slow = max(range(len(r["step_s"])), key=lambda i: r["step_s"][i])
        entry["slowest"] = {"step": slow, "s": r["step_s"][slow], "median_s": r["median_step_s"],
                            "length": (r.get("step_lengths") or [None] * (slow + 1))[slow],
                            **{k: r[k][w + slow] for k in ("step_host_allocs", "step_new_segments",
                                                           "step_alloc_retries", "step_gc_s") if k in r}}
    if key in PAIRS and PAIRS[key] in by and "error" not in r and "error" not in by[PAIRS[key]]:
        gap, n = loss_gap(r, by[PAIRS[key]])
        entry.update({"losses_vs": PAIRS[key], "loss_gap": gap, "losses_compared": n,
                      "speed_vs": r["real_tok_s"] / by[PAIRS[key]]["real_tok_s"]})
    summary.append(entry)
(out / "summary.json").write_text(json.dumps(summary, indent=1))

def f(v, fmt):
    return "-" if v is None else format(v, fmt)

print()
print(f"{'setup':46} {'q':5} {'b':>3} {'attention':>14} {'ckpt':>10} {'tok/s':>7} {'peak':>5} {'est':>5} {'pinned':>6} {'warm s':>6} "
      f"{'vs':>16} {'speed':>5} {'loss gap (n)':>13}")
for e in summary:
    if e["error"]:
        print(f"{e['setup'][:46]:46} {e['error'][:110]}")
        continue
    ck = e["checkpointing"]
    ck = "offload" if ck == "offload" else "yes" if ck else "no"
    if e.get("checkpointed_layers") is not None and e["checkpointed_layers"] != e.get("text_layers"):
        ck += f" {e['checkpointed_layers']}"
    gap = f"{e['loss_gap']:.3%} ({e['losses_compared']})" if e.get("loss_gap") is not None else "-"
    print(f"{e['setup'][:46]:46} {e['quantization']:5} {e['batch']:>3} {e.get('attention') or '-':>14} {ck:>10} "
          f"{e['real_tok_s']:>7,.0f} "
          f"{f(e['peak_gib'], '.1f'):>5} {f(e['predicted_peak_gib'], '.1f'):>5} {f(e.get('host_pinned_gib'), '.1f'):>6} "
          f"{e['warmup_s']:>6.1f} {e.get('losses_vs', '-')[:16]:>16} {f(e.get('speed_vs'), '.2f'):>5} {gap:>13}")
EOF
python3 - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

print()
print("slowest measured step per setup: s (median s), padded length, new pinned blocks, new GPU segments, "
      "allocation retries, GC s")
for e in json.loads((Path(sys.argv[1]) / "summary.json").read_text()):
    s = e.get("slowest")
    if s:
        print(f"{e['setup'][:46]:46} step {s['step']:>2}: {s['s']:.2f} ({s['median_s']:.2f}) len {s['length']} "
              f"pinned {s.get('step_host_allocs', '-')} segments {s.get('step_new_segments', '-')} "
              f"retries {s.get('step_alloc_retries', '-')} gc {s.get('step_gc_s', 0):.2f}")
EOF
exit "$code"
