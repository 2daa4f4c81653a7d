#!/usr/bin/env bash
# The real train stage (`dvc repro train`: render + XTuner's trainer) on the 1.8B shape, with the
# project's default GPU settings and with the tutorial's, on the same data; one JSON line a run in
# $OUT/stage.jsonl. Needs the XTuner stack and DVC importable (see benchmarks/README.md).
#   OUT=bench bash benchmarks/stage_runs.sh [ITERS]
set -euo pipefail
OUT=${OUT:-bench}; ITERS=${1:-40}
mkdir -p "$OUT" /tmp/bin
command -v python >/dev/null || ln -sf "$(command -v python3)" /tmp/bin/python
export PATH=/tmp/bin:$PATH PYTHONUNBUFFERED=1
[ -d .git ] || git init -q
git rev-parse -q --verify HEAD >/dev/null || { git add -A && git -c user.name=bench -c user.email=bench@localhost commit -qm bench; }
model=/tmp/models/internlm2-1_8b
[ -d "$model" ] || python scripts/random_model.py internlm2-1_8b "$model" --tokenizer models/tiny-internlm2
set_params() {  # python dict literal of params updates, by section
  python - "$1" <<'PY'
import ast, sys
from ruamel.yaml import YAML
yaml = YAML(); p = yaml.load(open("params.yaml"))
for section, values in ast.literal_eval(sys.argv[1]).items():
    p[section].update(values)
yaml.dump(p, open("params.yaml", "w"))
PY
}
set_params "{'model': {'path': '$model'}, 'data': {'repeat': 200, 'max_length': 2048},
  'lora': {'alpha': 16}, 'eval': {'interval': 100000, 'max_new_tokens': 8},
  'train': {'lr': 2e-4, 'global_batch': 16, 'max_iters': $ITERS, 'save_interval': 100000, 'warmup_iters': 2}}"
python -m dvc repro validate >/dev/null
run() {  # name, params updates
  set_params "$2"
  local t0=$(date +%s)
  python -m dvc repro train 2>&1 | grep -E "^\[render\]|^\[train\] models/adapter|rror" || true
  python - "$1" "$(( $(date +%s) - t0 ))" "$OUT/stage.jsonl" <<'PY'
import ast, json, sys
name, wall, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
pipeline = ast.literal_eval(open("models/config/xtuner_config.py").read().split("\npipeline = ", 1)[1])
m = json.load(open("reports/train/metrics.json"))
rec = {"run": name, "resolved": pipeline, "tokens_per_s": m.get("tokens_per_sec"),
       "peak_gb": round(m["peak_memory_mb"] * 2**20 / 1e9, 2) if m.get("peak_memory_mb") else None,
       "final_loss": m.get("final_loss"), "train_wall_s": m.get("wall_time_s"), "stage_wall_s": wall}
open(out, "a").write(json.dumps(rec) + "\n"); print(json.dumps(rec), flush=True)
PY
}
run "project default (24 GB budget)" "{'train': {'micro_batch': 'auto', 'memory_gb': 24, 'activation_checkpointing': 'auto', 'fused_loss': True, 'deepspeed': 'auto', 'precision': 'auto', 'optimizer': 'adamw'}, 'quant': {'upcast_frozen': False}}"
run "tutorial (fp16, 1 x 16, ZeRO-2)" "{'train': {'micro_batch': 1, 'memory_gb': 'auto', 'activation_checkpointing': True, 'fused_loss': False, 'deepspeed': 'zero2', 'precision': 'fp16', 'optimizer': 'adamw'}, 'quant': {'upcast_frozen': True}}"
