#!/usr/bin/env bash
# The real train stage (`dvc repro train`: render + XTuner's trainer) on randomly initialised
# models of real shapes; one JSON line a run in $OUT/stage.jsonl. Needs the XTuner stack and DVC
# importable (benchmarks/README.md).
#   OUT=bench bash benchmarks/stage_runs.sh compare [ITERS]   # 1.8B: project default vs tutorial
#   OUT=bench bash benchmarks/stage_runs.sh lean7b [ITERS]    # 7B within 8 GB
#   OUT=bench bash benchmarks/stage_runs.sh oom               # the out-of-memory message
#   OUT=bench bash benchmarks/stage_runs.sh convert           # 1.8B default, then convert + merge
#   OUT=bench bash benchmarks/stage_runs.sh startup           # convert + merge without, then with bytecode
#   OUT=bench bash benchmarks/stage_runs.sh eval              # 1.8B evaluate: transformers, then LMDeploy
#   OUT=bench bash benchmarks/stage_runs.sh text [ITERS]      # the text recipe's whole DAG, 1.8B, defaults
#   OUT=bench bash benchmarks/stage_runs.sh llava [ITERS]     # the llava recipe, whole DAG, real shapes
#   OUT=bench bash benchmarks/stage_runs.sh internvl          # the internvl recipe's stand-in, whole DAG
#   OUT=bench bash benchmarks/stage_runs.sh internvl2b [ITERS] # InternVL2-2B's structure at its real shapes, whole DAG
#   OUT=bench bash benchmarks/stage_runs.sh structures [ITERS] # 1.8B default: Llama beside InternLM2, then InternLM2's DAG
#   OUT=bench bash benchmarks/stage_runs.sh internlm2 [ITERS]  # InternLM2: 7B lean, then the 1.8B default's DAG
#   OUT=bench bash benchmarks/stage_runs.sh lean7b-structures [ITERS]  # 7B within 8 GB: Llama beside InternLM2
#   OUT=bench bash benchmarks/stage_runs.sh internvl2b-merge [ITERS]    # InternVL2-2B's shapes: train, convert, merge only
#   OUT=bench bash benchmarks/stage_runs.sh speed-structures [ITERS]   # 1.8B default: Llama, InternLM2, twice, alternating
#   OUT=bench bash benchmarks/stage_runs.sh select-cost 160       # 1.8B: 8 checkpoints scored by select, then beside the trainer
#   STAGE_MODEL=DIR OUT=bench bash benchmarks/stage_runs.sh speed-stage ITERS NAME UPDATES  # benchmarks/speed.sh's stage runs
#     (CONFIG_EDIT=SED_SCRIPT: applied to the rendered config before training, to measure a lever undone)
set -euo pipefail
SUITE=${1:-compare}; ITERS=${2:-30}; OUT=${OUT:-bench}
mkdir -p "$OUT" /tmp/bin /tmp/models
command -v python >/dev/null || ln -sf "$(command -v python3)" /tmp/bin/python
export PATH=/tmp/bin:$PATH PYTHONUNBUFFERED=1
source benchmarks/bytecode.sh  # as a user's install has it (BYTECODE=0: the host as it is)
[ -d .git ] || git init -q
git rev-parse -q --verify HEAD >/dev/null || { git add -A && git -c user.name=bench -c user.email=bench@localhost commit -qm bench; }

set_params() {  # a Python dict literal of updates, merged into params.yaml section by section
  python - "$1" <<'PY'
import ast, sys
from ruamel.yaml import YAML
yaml = YAML(); p = yaml.load(open("params.yaml"))
def merge(node, values):
    for key, value in values.items():
        if isinstance(value, dict) and value and isinstance(node.get(key), dict):
            merge(node[key], value)
        else:
            node[key] = value
merge(p, ast.literal_eval(sys.argv[1]))
yaml.dump(p, open("params.yaml", "w"))
PY
}
stamp() {  # each line of stdin with the time it came (seconds since the epoch), as DVC writes them
  python -u -c 'import sys, time
for line in sys.stdin: sys.stdout.write(f"{time.time():.2f} {line}")'
}
TOKENIZER=${TOKENIZER:-models/assistant/llm}  # the stand-in's tokenizer (`dvc repro stand_in@tiny` here, carried)
TINY_TEXT=$(mktemp -d)/tokenizer && cp -r "$TOKENIZER" "$TINY_TEXT"  # before a link replaces models/assistant/llm
link() {  # role, folder, [recipe]: a real-model run (`stand_in: {}`), the folder linked into models/<recipe>/<role>
  set_params "{'stand_in': {}}"
  python -m stages.link "$1" "$2" ${3:+--recipe $3} | tail -n 1
}
use_model() {  # shape, [arch: internlm2 (default) | llama], [recipe: assistant]: the random model linked in, data built
  local arch=${2:-internlm2} model=/tmp/models/$1-${2:-internlm2}
  [ -d "$model" ] || python scripts/random_model.py "$1" "$model" --arch "$arch" --tokenizer "$TINY_TEXT"
  use_dir "$model" "${3:-assistant}"
}
use_dir() {  # model folder, [recipe: assistant]: that folder linked in as the LLM, the benchmark's data and schedule
  link llm "$1" "${2:-assistant}"
  set_params "{'data': {'assistant': {'repeat': 200}, 'max_length': 2048},
    'lora': {'alpha': 16}, 'eval': {'interval': 100000, 'max_new_tokens': 8},
    'train': {'lr': 2e-4, 'global_batch': 16, 'max_iters': $ITERS, 'save_interval': 100000, 'warmup_iters': 2}}"
  [ "${2:-assistant}" != assistant ] || python -m dvc repro validate >/dev/null
}
record() {  # name, seconds, [status]: the train stage's figures as one JSON line
  python - "$1" "$2" "${3:-ok}" "$OUT/stage.jsonl" <<'PY'
import ast, json, re, sys
name, wall, status, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
pipeline = ast.literal_eval(open("models/config/xtuner_config.py").read().split("\npipeline = ", 1)[1])
rec = {"run": name, "status": status, "resolved": pipeline, "stage_wall_s": wall}
if status == "ok":
    m = json.load(open("reports/train/metrics.json"))
    rec.update(tokens_per_s=m.get("tokens_per_sec"), final_loss=m.get("final_loss"), train_wall_s=m.get("wall_time_s"),
               peak_gb=round(m["peak_memory_mb"] * 2**20 / 1e9, 2) if m.get("peak_memory_mb") else None)
    reserved = json.load(open("reports/stages/train.json")).get("peak_gpu_reserved_mb")  # the allocator's
    rec["reserved_gb"] = round(reserved * 2**20 / 1e9, 2) if reserved else None  # (the planner estimates it)
    # mmengine's logged iteration times (each the mean of its window), the first window (start-up) left out
    times = [float(t) for t in re.findall(r"Iter\(train\) \[\s*\d+/\d+\].*?\s time: ([0-9.]+)",
                                          open("reports/train/xtuner.log", errors="replace").read())]
    if len(times) > 1:
        rec["window_iter_time_s"] = round(sum(times[1:]) / len(times[1:]), 4)
open(out, "a").write(json.dumps(rec) + "\n"); print(json.dumps(rec), flush=True)
PY
}
run() {  # name, params updates
  set_params "$2"
  local t0=$(date +%s) log=$OUT/$(echo "$1" | tr -c 'a-zA-Z0-9\n' '_').log
  # FORCE: train again even when DVC's cache holds this run (its upstream stages as usual)
  # CONFIG_EDIT: a sed script applied to the rendered config before training (a lever undone, on its own)
  if { [ -z "${FORCE:-}" ] || python -m dvc repro render >"$log" 2>&1; } &&
     { [ -z "${CONFIG_EDIT:-}" ] || edit_config "$log"; } &&
     python -m dvc repro ${FORCE:+-f -s} train >>"$log" 2>&1; then record "$1" $(( $(date +%s) - t0 ))
  else grep -E "^error:|^ERROR" "$log" | tail -n 3; record "$1" $(( $(date +%s) - t0 )) failed; fi
}
edit_config() {  # log: CONFIG_EDIT applied to the rendered config; an edit that changes nothing stops the run
  local config=models/config/xtuner_config.py
  cp "$config" /tmp/config.before && sed -i -e "$CONFIG_EDIT" "$config"
  ! cmp -s /tmp/config.before "$config" || { echo "error: CONFIG_EDIT changed nothing in $config" | tee -a "$1"; false; }
}
set_recipe() {  # recipe
  python - "$1" <<'PY'
import sys
from ruamel.yaml import YAML
yaml = YAML(); p = yaml.load(open("params.yaml")); p["recipe"] = sys.argv[1]; yaml.dump(p, open("params.yaml", "w"))
PY
}
dag() {  # recipe, name: the whole DAG with that recipe; every stage's record, metrics and report
  set_recipe "$1"
  local t0=$(date +%s) status=ok
  python -m dvc repro >"$OUT/$1.log" 2>&1 || { status=failed; grep -E "^error:|^ERROR" "$OUT/$1.log" | tail -n 3; }
  python - "$OUT/stage.jsonl" "$2" "$status" $(( $(date +%s) - t0 )) <<'PY'
import json, sys
from pathlib import Path
rec = {"run": sys.argv[2], "status": sys.argv[3], "repro_wall_s": int(sys.argv[4])}
rec["stages"] = {p.stem: json.loads(p.read_text()) for p in sorted(Path("reports/stages").glob("*.json"))}
for name in ("train/metrics.json", "merge.json", "eval/metrics.json", "data_stats.json"):
    path = Path("reports", name)
    if path.is_file():
        rec[name] = json.loads(path.read_text())
open(sys.argv[1], "a").write(json.dumps(rec) + "\n"); print(json.dumps(rec), flush=True)
PY
  cp reports/report.md "$OUT/$1-report.md" 2>/dev/null || true
}
convert_merge() {  # name, [-f]: convert and merge (again), each stage's phases as one JSON line
  for stage in convert merge; do python -m dvc repro -s ${2:-} $stage 2>&1 | grep -E "^\[$stage\]|rror" | tail -n 4 || true; done
  python - "$OUT/stage.jsonl" "$1" <<'PY'
import json, sys
rec = {"run": sys.argv[2]}
for stage in ("convert", "merge"):
    rec[stage] = json.load(open(f"reports/stages/{stage}.json"))
    rec[f"{stage}_s"] = rec[stage].get("wall_time_s")
open(sys.argv[1], "a").write(json.dumps(rec) + "\n"); print(json.dumps(rec))
PY
}
internvl2b_model() {  # /tmp/models/internvl2-2b: InternViT-300M at 448 px + InternLM2-1.8B, both random
  [ -d /tmp/models/internlm2-1_8b-internlm2 ] || python scripts/random_model.py internlm2-1_8b \
    /tmp/models/internlm2-1_8b-internlm2 --arch internlm2 --tokenizer "$TINY_TEXT" | tail -n 1
  [ -d /tmp/models/internvl2-2b ] || python -c "from pathlib import Path; from stages import params as P
from stages.recipes.internvl import model
info = model.build(P.TinyInternVL(image_size=448, patch_size=14, hidden_size=1024, num_layers=24, num_heads=16,
                                  intermediate_size=4096, downsample_ratio=0.5, max_dynamic_patch=6, seed=0),
                   Path('/tmp/models/internlm2-1_8b-internlm2'), Path('/tmp/models/internvl2-2b'))
print('[internvl]', info['path'], f\"{info['parameters']:,} parameters\")"
}
DEFAULT="{'train': {'micro_batch': 'auto', 'memory_gb': 24, 'activation_checkpointing': 'auto', 'fused_loss': True,
  'compile_layers': 'auto', 'cuda_graphs': True, 'deepspeed': 'auto', 'precision': 'auto', 'optimizer': 'adamw'}, 'quant': {'upcast_frozen': False}}"
case $SUITE in
  compare)
    use_model internlm2-1_8b
    run "project default (24 GB budget)" "$DEFAULT"
    run "tutorial (fp16, 1 x 16, ZeRO-2)" "{'train': {'micro_batch': 1, 'memory_gb': 'auto', 'activation_checkpointing': True,
      'fused_loss': False, 'compile_layers': False, 'deepspeed': 'zero2', 'precision': 'fp16', 'optimizer': 'adamw'},
      'quant': {'upcast_frozen': True}}" ;;
  structures)  # the same default run on both structures of the 1.8B shape, then the rest of InternLM2's DAG
    use_model internlm2-1_8b llama
    run "1.8B Llama structure, default (24 GB budget)" "$DEFAULT"
    use_model internlm2-1_8b internlm2
    run "1.8B InternLM2 structure, default (24 GB budget)" "$DEFAULT"
    dag assistant "assistant recipe, InternLM2-1.8B structure, default GPU settings" ;;
  speed-stage)  # ITERS NAME UPDATES, with STAGE_MODEL: the train stage on that folder, the defaults, then UPDATES;
    # each run from params.yaml as the first run found it (kept in $OUT; an earlier run's updates would carry
    # over otherwise) and with no scorer beside the trainer (select.during_training: select-cost measures that)
    [ -f "$OUT/params.start.yaml" ] || cp params.yaml "$OUT/params.start.yaml"
    cp "$OUT/params.start.yaml" params.yaml
    use_dir "${STAGE_MODEL:?set STAGE_MODEL}"
    set_params "$DEFAULT"
    set_params "{'select': {'during_training': False}}"
    rm -rf models/work  # a whole training run each time: a run like the one before would resume from its end
    FORCE=1 run "$3" "$4" ;;
  speed-structures)  # train stage only, alternating, so that the spread between runs shows beside the difference
    for round in 1 2; do
      use_model internlm2-1_8b llama
      FORCE=1 run "1.8B Llama structure, default (24 GB budget), round $round" "$DEFAULT"
      use_model internlm2-1_8b internlm2
      FORCE=1 run "1.8B InternLM2 structure, default (24 GB budget), round $round" "$DEFAULT"
    done ;;
  lean7b-structures)
    LEAN="{'train': {'micro_batch': 1, 'memory_gb': 8, 'activation_checkpointing': True, 'fused_loss': True,
      'compile_layers': 'auto', 'deepspeed': 'none', 'optimizer': 'paged_adamw8bit'}, 'quant': {'upcast_frozen': False}}"
    use_model 7b llama
    run "7B Llama structure, lean (8 GB budget)" "$LEAN"
    use_model 7b internlm2
    run "7B InternLM2 structure, lean (8 GB budget)" "$LEAN" ;;
  internlm2)  # InternLM2 structure alone: 7B within 8 GB, then the 1.8B default's whole DAG (evaluate included)
    use_model 7b internlm2
    run "7B InternLM2 structure, lean (8 GB budget)" "{'train': {'micro_batch': 1, 'memory_gb': 8,
      'activation_checkpointing': True, 'fused_loss': True, 'compile_layers': 'auto', 'deepspeed': 'none',
      'optimizer': 'paged_adamw8bit'}, 'quant': {'upcast_frozen': False}}"
    use_model internlm2-1_8b internlm2
    set_params "$DEFAULT"
    dag assistant "assistant recipe, InternLM2-1.8B structure, default GPU settings" ;;
  lean7b)
    use_model 7b
    run "7B lean (8 GB budget)" "{'train': {'micro_batch': 1, 'memory_gb': 8, 'activation_checkpointing': True,
      'fused_loss': True, 'compile_layers': 'auto', 'deepspeed': 'none', 'optimizer': 'paged_adamw8bit'},
      'quant': {'upcast_frozen': False}}" ;;
  oom)
    use_model internlm2-1_8b
    run "out of memory on purpose" "{'train': {'micro_batch': 16, 'memory_gb': 70, 'activation_checkpointing': False,
      'fused_loss': False, 'compile_layers': False, 'deepspeed': 'none', 'optimizer': 'adamw'}}" ;;
  convert)
    use_model internlm2-1_8b
    run "project default (24 GB budget)" "$DEFAULT"
    convert_merge "convert + merge, 1.8B" ;;
  startup)  # the same convert + merge three times: as the host runs Python (no bytecode anywhere,
    # PYTHONDONTWRITEBYTECODE=1), then with a bytecode cache (PYTHONPYCACHEPREFIX) being written, then warm
    use_model internlm2-1_8b
    run "project default (24 GB budget)" "$DEFAULT"
    convert_merge "convert + merge, 1.8B, no bytecode" -f
    export PYTHONPYCACHEPREFIX=/tmp/pycache; unset PYTHONDONTWRITEBYTECODE
    convert_merge "convert + merge, 1.8B, writing bytecode" -f
    for i in 1 2 3; do convert_merge "convert + merge, 1.8B, with bytecode ($i)" -f; done ;;
  eval)  # 1.8B default training, convert, merge; evaluate with transformers, then with LMDeploy
    # ($LMDEPLOY_PYTHON, benchmarks/lmdeploy_env.sh): the same merged model, prompts and greedy decoding
    use_model internlm2-1_8b
    python - <<'PY' | "${LMDEPLOY_PYTHON:?set LMDEPLOY_PYTHON}" -c "$(python -c 'from stages.evaluate import LMDEPLOY_SCRIPT; print(LMDEPLOY_SCRIPT)')" \
      > "$OUT/lmdeploy-smoke.log" 2>&1 || { tail -n 25 "$OUT/lmdeploy-smoke.log"; exit 1; }  # fails fast
import json
from stages.evaluate import lmdeploy_template
print(json.dumps({"models": ["/tmp/models/internlm2-1_8b"], "prompts": ["hello", "who are you?"],
                  "template": lmdeploy_template(""), "max_new_tokens": 16, "seed": 0}))
PY
    tail -n 1 "$OUT/lmdeploy-smoke.log"
    run "project default (24 GB budget)" "$DEFAULT"
    for stage in convert merge; do python -m dvc repro -s $stage 2>&1 | grep -E "^\[$stage\]|rror" | tail -n 2 || true; done
    for backend in transformers lmdeploy; do
      set_params "{'eval': {'backend': '$backend', 'max_new_tokens': 128}}"
      python -m dvc repro -s evaluate > "$OUT/evaluate-$backend.log" 2>&1 || grep -E "^error|rror" "$OUT/evaluate-$backend.log" | tail -n 3
      python - "$OUT/stage.jsonl" "$backend" <<'PY'
import json, sys
rec = {"run": f"evaluate, 1.8B merged, {sys.argv[2]}", "eval": json.load(open("reports/eval/metrics.json")),
       "stage": json.load(open("reports/stages/evaluate.json"))}
open(sys.argv[1], "a").write(json.dumps(rec) + "\n"); print(json.dumps(rec))
PY
    done ;;
  text)  # the text recipe's whole DAG at the 1.8B shape with the default GPU settings
    use_model internlm2-1_8b
    set_params "$DEFAULT"
    dag assistant "assistant recipe, InternLM2-1.8B shape, default GPU settings" ;;
  llava)  # InternLM2-1.8B-shaped LLM + CLIP ViT-L/14-336-shaped encoder, both random; every stage
    set_recipe llava
    use_model internlm2-1_8b internlm2 llava
    [ -d /tmp/models/clip-336 ] || python -c "from stages import params as P; from stages.recipes.llava import vision
vision.build(P.TinyVision(image_size=336, patch_size=14, hidden_size=1024, num_layers=24, num_heads=16,
                          intermediate_size=4096, seed=0), __import__('pathlib').Path('/tmp/models/clip-336'))"
    link vision /tmp/models/clip-336 llava
    set_params "{'llava': {'pretrain': {'lr': 1e-3, 'max_iters': $ITERS, 'warmup_iters': 2}, 'merge_tolerance': 1.0},
      'eval': {'max_new_tokens': 16}, 'train': {'micro_batch': 8, 'global_batch': 16}}"  # the fine-tune: use_model's train
    dag llava "llava recipe, InternLM2-1.8B + CLIP ViT-L/14-336 shapes" ;;
  internvl2b)  # InternVL2-2B's structure and shapes: InternViT-300M at 448 px (random) + InternLM2-1.8B (random), every stage
    set_recipe internvl
    internvl2b_model
    link model /tmp/models/internvl2-2b internvl
    set_params "{'data': {'max_length': 2048}, 'internvl': {'merge_tolerance': 1.0}, 'eval': {'max_new_tokens': 16},
      'train': {'lr': 4e-5, 'max_iters': $ITERS, 'warmup_iters': 2, 'micro_batch': 4, 'global_batch': 16}}"
    dag internvl "internvl recipe, InternVL2-2B structure and shapes (InternViT-300M + InternLM2-1.8B)" ;;
  internvl2b-merge)  # InternVL2-2B's shapes through train, convert and merge only
    set_recipe internvl
    internvl2b_model
    link model /tmp/models/internvl2-2b internvl
    set_params "{'data': {'max_length': 2048},
      'train': {'lr': 4e-5, 'max_iters': $ITERS, 'warmup_iters': 2, 'micro_batch': 4, 'global_batch': 16}}"
    python -m dvc repro merge 2>&1 | grep -E "^\[(train|convert|merge)\]|rror" | grep -v params | tail -n 12
    cp reports/merge.json "$OUT/merge.json" 2>/dev/null || true ;;
  select-cost)  # issue: scoring every checkpoint costs <= 10% of the run. 1.8B default, ITERS iterations,
    # a checkpoint every ITERS/8 with the evaluate prompts' defaults; train, then select: once scored by the select
    # stage after training, once by the scorer beside the trainer (select.during_training), both after a warm-up
    # run (RUNS below says which, in what order); with BASELINE=1 first the same training without checkpoints (what
    # saving them costs)
    use_model internlm2-1_8b
    set_params "$DEFAULT"
    set_params "{'eval': {'interval': 50, 'max_new_tokens': 48}}"
    select_cost() {  # name, save_interval, during_training (True | False)
      set_params "{'train': {'save_interval': $2}, 'select': {'during_training': $3}}"
      python -m dvc repro render >/dev/null 2>&1
      rm -rf models/work  # a whole training run each time (the same config would resume), no scores kept
      local t0=$(date +%s.%N) t1 t2 status=ok at="$3${TAG:-}"  # the logs' names: during, and the run's tag
      vmstat -t 1 >"$OUT/select-cost-vmstat-$at.log" 2>&1 & local vm=$!  # the host's CPU, I/O wait and disk traffic
      # the GPU's clocks, power and load twice a second (does the scorer's work lower the trainer's clocks?)
      nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,utilization.gpu,temperature.gpu \
        --format=csv,noheader -lms 500 >"$OUT/select-cost-gpu-$at.log" 2>&1 & local smi=$!
      if [ "${ONE_DVC:-1}" = 1 ] && [ "$2" -le "$ITERS" ]; then
        # train and select in one DVC process, as a user's `dvc repro` runs them: DVC starts once (the runs before
        # 2026-12-03 started it again for select, 1.4-2 s that no user pays); the train part ends at select's line
        python -m dvc repro -f -s train select 2>&1 | stamp >"$OUT/select-cost-train-$2-$at.log" || status=failed
        t2=$(date +%s.%N)
        t1=$(grep -m1 "Running stage 'select'" "$OUT/select-cost-train-$2-$at.log" | cut -d' ' -f1)
        t1=${t1:-$t2}
        kill $vm $smi 2>/dev/null || true
        cp models/work/scores/scorer.log "$OUT/select-cost-scorer-$at.log" 2>/dev/null || true
      else
        python -m dvc repro -f -s train 2>&1 | stamp >"$OUT/select-cost-train-$2-$at.log" \
          || status=failed
        t1=$(date +%s.%N)
        kill $vm $smi 2>/dev/null || true
        cp models/work/scores/scorer.log "$OUT/select-cost-scorer-$at.log" 2>/dev/null || true
        [ "$2" -gt "$ITERS" ] || python -m dvc repro -s select 2>&1 | stamp \
          >"$OUT/select-cost-select-$at.log" || status=failed
        t2=$(date +%s.%N)
      fi
      python - "$OUT/stage.jsonl" "$1" "$status" "$t0" "$t1" "$t2" "$2" "$3" "$at" "${ONE_DVC:-1}" <<'PY'
import json, sys
from pathlib import Path
out, name, status, t0, t1, t2, interval, during, at, one_dvc = sys.argv[1:]
train_s, select_s = float(t1) - float(t0), float(t2) - float(t1)
rec = {"run": name, "status": status, "save_interval": int(interval), "during_training": during == "True",
       "train_stage_wall_s": round(train_s, 1), "select_stage_wall_s": round(select_s, 1),
       "one_dvc_process": one_dvc == "1", "wall_s": round(train_s + select_s, 1)}
starts = {"train": float(t0), "select": float(t1)}
rec["stamps"] = {}  # seconds from the command's start to DVC's lines (the `stamp` prefix), per stage's log
for stage, log in (("train", f"select-cost-train-{interval}-{at}"), ("select", f"select-cost-select-{at}")):
    path = Path(out).parent / (log + ".log")
    if path.is_file():
        lines = [l.split(" ", 1) for l in path.read_text(errors="replace").splitlines() if l[:1].isdigit()]
        marks, current = ({"first line": 0} if lines else {}), None
        for i, (t, text) in enumerate(lines):
            if text.startswith("Running stage"):
                current = text.split("'")[1] if one_dvc == "1" else None
                marks[f"{current} started" if current else "stage started"] = i
            elif text.startswith("Updating lock file"):
                marks[f"lock file after {current}" if current else "lock file"] = i
        rec["stamps"][stage] = {k: round(float(lines[i][0]) - starts[stage], 2) for k, i in marks.items()} | (
            {"last line": round(float(lines[-1][0]) - starts[stage], 2)} if lines else {})
for key, path in (("train", "reports/stages/train.json"), ("select", "reports/stages/select.json"),
                  ("choice", "reports/select/choice.json"), ("metrics", "reports/train/metrics.json")):
    if Path(path).is_file() and (key != "select" and key != "choice" or select_s > 0.5):
        rec[key] = json.loads(Path(path).read_text())
if "select" in rec:
    rec["select_share_of_train"] = round(select_s / max(1.0, train_s), 3)
open(out, "a").write(json.dumps(rec) + "\n"); print(json.dumps(rec)[:1500], flush=True)
PY
      grep -hE "^[0-9.]+ (\[(train|select)\]|error)" "$OUT/select-cost-train-$2-$at.log" \
        "$OUT/select-cost-select-$at.log" 2>/dev/null | tail -n 8 || true
      cp reports/select/scores.json "$OUT/select-cost-scores-$at.json" 2>/dev/null || true
      cp reports/train/xtuner.log "$OUT/select-cost-xtuner-$2-$at.log" 2>/dev/null || true  # its 10-iteration windows
    }
    # warm torch.compile's cache first, so that no run below pays it; a warm machine keeps it in /tmp between calls
    [ -f /tmp/.select-cost-warm ] && ONLY_CHECKPOINTS=${ONLY_CHECKPOINTS:-1}
    [ -n "${ONLY_CHECKPOINTS:-}" ] || set_params "{'train': {'max_iters': 10, 'save_interval': 100000000}, 'select': {'during_training': False}}"
    [ -n "${ONLY_CHECKPOINTS:-}" ] || { { python -m dvc repro render && python -m dvc repro -f -s train; } >"$OUT/select-cost-warm-up.log" 2>&1 \
      && touch /tmp/.select-cost-warm || echo "warm-up failed"; }
    set_params "{'train': {'max_iters': $ITERS}}"
    [ -z "${BASELINE:-}" ] || select_cost "1.8B default, $ITERS iterations, no checkpoints" 100000000 False
    # RUNS: the runs in order (default "after beside"): `after` trains with no scorer, then the select stage scores;
    # `beside` scores beside the trainer; `besideN` does with N checkpoints a batch (stages/recipes/assistant/select.py
    # BESIDE_GROUP, the source edited here); "after beside after" brackets a beside run between two without
    n=0 grouped=stages/recipes/assistant/select.py given=$(mktemp)
    cp "$grouped" "$given"  # each `beside` run starts from the source as given; `besideN` edits BESIDE_GROUP
    for what in ${RUNS:-after beside}; do
      n=$((n + 1)); TAG=-run$n; group=${what#beside}
      case $what in
        after) select_cost "1.8B default, $ITERS iterations, 8 checkpoints, then select (run $n)" $((ITERS / 8)) False ;;
        beside*) cp "$given" "$grouped"
          [ -z "$group" ] || sed -i "s/^BESIDE_GROUP = .*/BESIDE_GROUP = $group/" "$grouped"
          select_cost "1.8B default, $ITERS iterations, 8 checkpoints scored beside the trainer${group:+ ($group at a time)}, then select (run $n)" $((ITERS / 8)) True ;;
      esac
    done ;;
  internvl)  # the internvl recipe's tiny stand-in on a GPU: bf16, 4-bit on CUDA, every stage
    dag internvl "internvl recipe, the tiny stand-in on the GPU" ;;
esac
