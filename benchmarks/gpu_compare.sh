#!/usr/bin/env bash
# The side-by-side run of the benchmark on one GPU host, in one call: the plain QLoRA loop, the
# project's train stage with its default settings and with the tutorial's (1.8B shape), then the
# 7B shape's lean settings. Figures: $OUT/levers.jsonl and $OUT/stage.jsonl (benchmarks/README.md).
#   OUT=bench bash benchmarks/gpu_compare.sh
set -uo pipefail
OUT=${OUT:-bench}
mkdir -p "$OUT" /tmp/models
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
m18=/tmp/models/internlm2-1_8b m7=/tmp/models/7b
[ -d $m18 ] || python3 scripts/random_model.py internlm2-1_8b $m18 --tokenizer models/assistant/llm | tail -1
python3 -m benchmarks.plain_loop $m18 --shape internlm2-1_8b --micro-batches 1 2 4 8 --out "$OUT/levers.jsonl" 2>&1 \
  | grep -E '^\{|Error' | tail -n 8
timeout 330 bash benchmarks/stage_runs.sh compare 30 2>&1 | grep -E '^\{|^\[render\] resolved|rror' | tail -n 20
[ -d $m7 ] || python3 scripts/random_model.py 7b $m7 --tokenizer models/assistant/llm | tail -1
python3 -m benchmarks.levers $m7 --shape 7b --plan lean8c --out "$OUT/levers.jsonl" 2>&1 | grep -E '^\{|Error' | tail -n 8
