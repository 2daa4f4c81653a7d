#!/usr/bin/env bash
# `python -m stages.chat` on the GPU machine with both backends: transformers in this Python, LMDeploy's
# PyTorch engine in its own ($LMDEPLOY_PYTHON, benchmarks/lmdeploy_env.sh). First the workspace's tiny
# merged model (models/merged, models/adapter and models/assistant carried), its answer set beside the
# evaluate stage's greedy one in reports/eval/generations.jsonl; a piped session with /reset; then a
# random model of InternLM2-1.8B's structure and shape. Everything under $OUT; a summary on stdout.
#   LMDEPLOY_PYTHON=/tmp/lmd/python OUT=bench bash benchmarks/gpu_chat.sh
set -uo pipefail
OUT=${OUT:-bench}; mkdir -p "$OUT" /tmp/models
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
ask() {  # name, prompt, chat options...: one answer, timed, with its stderr kept
  local name=$1 prompt=$2; shift 2
  local t0=$SECONDS
  timeout -k 5 300 python -m stages.chat --prompt "$prompt" "$@" >"$OUT/$name.out" 2>"$OUT/$name.err"
  echo "== $name: rc $? in $((SECONDS - t0)) s, $(wc -l <"$OUT/$name.err") stderr lines: $(head -c 300 "$OUT/$name.out" | tr '\n' ' ')"
  grep -E "^error|Traceback" "$OUT/$name.err" | head -n 3
}
python3 -c "import json
for line in open('reports/eval/generations.jsonl'):
    r = json.loads(line)
    if r['prompt'] == '你是谁': print('== evaluate stage, tuned, 你是谁:', r['tuned'][:300])"
for backend in transformers lmdeploy; do
  ask "tiny-merged-$backend" 你是谁 --backend "$backend" --max-new-tokens 48
done
ask tiny-base-lmdeploy 你是谁 --backend lmdeploy --base --max-new-tokens 48
ask tiny-adapter-lmdeploy 你是谁 --backend lmdeploy --adapter models/adapter  # refused in one line
t0=$SECONDS
printf '你是谁\n/reset\n你好\n/exit\n' | timeout -k 5 300 python -m stages.chat --backend lmdeploy --max-new-tokens 32 \
  >"$OUT/tiny-session-lmdeploy.out" 2>"$OUT/tiny-session-lmdeploy.err"
echo "== piped session, lmdeploy: rc $? in $((SECONDS - t0)) s"; head -c 800 "$OUT/tiny-session-lmdeploy.out"; echo
tok=$(mktemp -d)/tokenizer && cp -r models/assistant/llm "$tok"
big=/tmp/models/internlm2-1_8b-internlm2
[ -d "$big" ] || python scripts/random_model.py internlm2-1_8b "$big" --arch internlm2 --tokenizer "$tok" | tail -n 1
for backend in transformers lmdeploy; do
  ask "internlm2-1_8b-$backend" 你是谁 --model "$big" --backend "$backend" --max-new-tokens 16
done
