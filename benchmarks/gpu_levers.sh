#!/usr/bin/env bash
# The lever sweep and the plain-loop baseline on a GPU host, for both shapes; one JSON line per
# measurement in $OUT/levers.jsonl (kept if the run is cut off). Needs the XTuner stack importable
# (see README, "Benchmarks") and a tokenizer folder (models/assistant/llm, from `dvc repro stand_in@tiny`).
#   OUT=bench bash benchmarks/gpu_levers.sh [SHAPES...]
set -uo pipefail
OUT=${OUT:-bench}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-}
PY=$(command -v python || command -v python3)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
for shape in "${@:-internlm2-1_8b 7b}"; do
  for s in $shape; do
    model=/tmp/models/$s
    [ -d "$model" ] || $PY scripts/random_model.py "$s" "$model" --tokenizer models/assistant/llm
    if [ "$s" = 7b ]; then mbs="1 2"; plan=lean; else mbs="1 2 4 8"; plan=sweep; fi
    $PY -m benchmarks.plain_loop "$model" --shape "$s" --micro-batches $mbs --out "$OUT/levers.jsonl" 2>&1 \
      | grep -v -i warn | tail -n 20
    $PY -m benchmarks.levers "$model" --shape "$s" --plan "$plan" --out "$OUT/levers.jsonl" 2>&1 \
      | grep -E '^\{|Error|error' | tail -n 40
  done
done
