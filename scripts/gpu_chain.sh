#!/usr/bin/env bash
# The whole pipeline on a GPU host, on a randomly initialised model of InternLM2-chat-1.8B's shape,
# with the real XTuner, DeepSpeed and DVC. Run by the project on its GPU machine (see README.md,
# "Measured on a GPU"); figures land in $OUT (default: gpu-run/).
#   bash scripts/gpu_chain.sh [GPUS]
set -euo pipefail
GPUS=${1:-1}
OUT=${OUT:-gpu-run}
mkdir -p "$OUT" /tmp/bin
command -v python >/dev/null || ln -sf "$(command -v python3)" /tmp/bin/python
export PATH=/tmp/bin:$PATH PYTHONUNBUFFERED=1
if command -v git >/dev/null; then
  [ -d .git ] || git init -q
  git rev-parse -q --verify HEAD >/dev/null \
    || { git add -A && git -c user.name=gpu -c user.email=gpu@localhost commit -qm gpu; }
else
  python -m dvc config --local core.no_scm true
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
t0=$(date +%s)
python -m dvc repro stand_in@tiny  # the tiny tokenizer the random model takes
python scripts/random_model.py internlm2-1_8b /tmp/models/internlm2-1_8b-random --tokenizer models/assistant/llm
# The real shape's settings (the tutorial's, but bf16 and a bounded run): 9,000 conversations packed
# to 2048 tokens, micro-batch 1 x accumulation 16.
python - "$GPUS" <<'PY'
import sys
from ruamel.yaml import YAML
yaml = YAML()
p = yaml.load(open("params.yaml"))
p["stand_in"] = {}  # a real-model run: the random model linked in below
p["data"]["assistant"].update(repeat=200)
p["data"].update(max_length=2048)
p["lora"].update(alpha=16)
p["train"].update(lr=2e-4, global_batch=16, max_iters=160, save_interval=80, gpus=int(sys.argv[1]))
p["eval"].update(interval=10000, max_new_tokens=32)
yaml.dump(p, open("params.yaml", "w"))
PY
python -m stages.link llm /tmp/models/internlm2-1_8b-random
python -m dvc repro 2>&1 | tee "$OUT/repro.log" | grep -E "^Running stage|^\[|Error|error|Iter\(train\) \[ *[0-9]*0/" || true
echo "total $(( $(date +%s) - t0 )) s" | tee -a "$OUT/repro.log"
# Everything a reviewer needs, in one archive: the report, metrics, loss curve, stage times, config.
cp models/config/xtuner_config.py reports/
tar czf "$OUT/reports.tgz" reports/report.md reports/loss.png reports/metrics.json reports/merge.json \
  reports/data_stats.json reports/eval reports/stages reports/train reports/xtuner_config.py
