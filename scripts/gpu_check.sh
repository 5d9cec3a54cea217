#!/usr/bin/env bash
# The GPU check of issue 12, in one run of at most ~8 minutes: the full-size smoke
# (scripts/fullsize_smoke.py) on CUDA in bfloat16 for both architectures, 1,319 GSM8K problems at
# 256 new tokens, then phase 1 of the claims suite on the LLaMA-shaped checkpoint. No network.
#
#   OUT=/some/folder bash scripts/gpu_check.sh
#
# Every stage runs under `timeout`: a stage cut short still leaves what it measured (the smoke
# rewrites its JSON after each condition). Written to $OUT, as it happens (8 files, so that a
# device tool returning at most 8 gets them all): smoke-gpt2.json, smoke-llama.json,
# phase1_claims.json, smoke-gpt2.log, smoke-llama.log, phase1.log, nvidia-smi.txt and
# stages.json (per stage: exit status, seconds, timed_out). The phase-1 report stays in $WORK. The environment overrides the sizes, e.g. for a CPU trial of the same
# command lines with the toy-size checkpoints:
#   OUT=/tmp/gpu-trial DEVICE=cpu TINY=1 N=4 MAX_NEW=8 PHASE1_N=4 bash scripts/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the folder for the results}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bfloat16}
N=${N:-1319}
MAX_NEW=${MAX_NEW:-256}
BATCH=${BATCH:-512}
PHASE1_N=${PHASE1_N:-50}
WORK=${WORK:-/tmp/codi-gpu-check}
TINY_FLAG=${TINY:+--tiny}
# seconds per stage: 110 + 190 + 160 = 460 s, under 8 minutes with the start-up around them
T_GPT2=${T_GPT2:-110}
T_LLAMA=${T_LLAMA:-190}
T_PHASE1=${T_PHASE1:-160}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT" "$WORK"
STAGES="$OUT/stages.json"
echo "{}" > "$STAGES"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true

stage() {  # stage NAME SECONDS COMMAND...: run under timeout, record status and seconds
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local status=$?
  python - "$STAGES" "$name" "$status" "$((SECONDS - start))" "$limit" <<'PY'
import json, sys
path, name, status, seconds, limit = sys.argv[1:]
stages = json.load(open(path))
stages[name] = {"exit": int(status), "seconds": int(seconds), "limit": int(limit), "timed_out": int(status) in (124, 137)}
json.dump(stages, open(path, "w"), indent=2)
PY
  echo "$name: exit $status after $((SECONDS - start)) s (limit $limit s)"
}

for arch in gpt2 llama; do
  limit=$T_GPT2
  [ "$arch" = llama ] && limit=$T_LLAMA
  stage "smoke-$arch" "$limit" python scripts/fullsize_smoke.py --arch "$arch" --device "$DEVICE" --dtype "$DTYPE" \
    --n "$N" --max-new-tokens "$MAX_NEW" --batch-size "$BATCH" --workdir "$WORK/$arch" \
    --json-out "$OUT/smoke-$arch.json" $TINY_FLAG
done

# phase 1 on the LLaMA-shaped checkpoint the smoke built (a stage cut short before the build
# finished leaves none: the marker file is written last)
# each output line is prefixed with the seconds since the stage began (-v: one line per claim),
# so a run cut short still shows how long each finished claim took
phase1() {  # the timeout is on pytest itself: killing the pipeline's shell would leave it running
  set -o pipefail
  local start=$SECONDS
  timeout -k 10 "$T_PHASE1" python -m pytest hypotheses/ -k phase1 --model "$WORK/llama/ckpt" --base "$WORK/llama/base" \
    --data gsm8k --n-problems "$PHASE1_N" --batch-size "$BATCH" --device "$DEVICE" --dtype "$DTYPE" \
    -p no:cacheprovider -v --durations=0 --report-dir "$WORK/phase1" --no-cache 2>&1 |
    while IFS= read -r line; do echo "[$((SECONDS - start)) s] $line"; done
}
export -f phase1
export WORK PHASE1_N BATCH DEVICE DTYPE OUT T_PHASE1
if [ -f "$WORK/llama/built.json" ]; then
  rm -rf "$WORK/phase1"
  stage phase1 "$((T_PHASE1 + 20))" bash -c phase1
  cp "$WORK/phase1/claims.json" "$OUT/phase1_claims.json" 2>/dev/null || echo "phase1: no claims.json (cut short)"
else
  echo "phase1: skipped, no LLaMA-shaped checkpoint was built"
fi
cat "$STAGES"
