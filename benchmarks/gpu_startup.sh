#!/usr/bin/env bash
# One call to the GPU host: what Python start-up costs there, and convert + merge of the 1.8B model
# as the host runs Python (no bytecode) against the same with a bytecode cache, side by side.
#   OUT=bench [ITERS=4] bash benchmarks/gpu_startup.sh
# Files: host.txt (the host's Python, its packages, where bytecode is), import_times.txt,
# importtime-*.txt (python -X importtime, warm cache), stage.jsonl (the startup suite of stage_runs.sh).
set -uo pipefail
OUT=$(realpath -m "${OUT:-bench}")
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
{
  env | grep -E '^PYTHON|^PIP' | sort
  PYTHONPATH= python3 - <<'PY'
import importlib.util, os, sys
print(sys.version.split()[0], "dont_write_bytecode", sys.dont_write_bytecode, "pycache_prefix", sys.pycache_prefix)
for name in ("torch", "transformers", "triton", "numpy"):
    spec = importlib.util.find_spec(name)
    if spec is None:
        print(name, "missing"); continue
    root = os.path.dirname(spec.origin)
    files = [f for _, _, fs in os.walk(root) for f in fs]
    print(name, root, sum(f.endswith(".py") for f in files), ".py", sum(f.endswith(".pyc") for f in files), ".pyc",
          "writable" if os.access(root, os.W_OK) else "read-only")
PY
  echo "# system packages"; PYTHONPATH= python3 -m pip list --format=freeze 2>/dev/null
} > "$OUT/host.txt" 2>&1
SETS=(torch "merge's, lean" "convert's, lean")
times() { echo "# $1" >> "$OUT/import_times.txt"; python3 -m benchmarks.import_times "${SETS[@]}" | tee -a "$OUT/import_times.txt"; }
times "as the host runs Python ($(env | grep -c PYTHONDONTWRITEBYTECODE=1) = PYTHONDONTWRITEBYTECODE set)"
( export PYTHONPYCACHEPREFIX=/tmp/pycache-probe; unset PYTHONDONTWRITEBYTECODE
  times "PYTHONPYCACHEPREFIX, first run (writes the cache)"; times "PYTHONPYCACHEPREFIX, warm"
  python3 -X importtime -c "$(python3 -c "from benchmarks.import_times import SETS; print(SETS[\"merge's, lean\"])")" 2> "$OUT/importtime-merge.txt"
  python3 -X importtime -c "$(python3 -c "from benchmarks.import_times import SETS; print(SETS[\"convert's, lean\"])")" 2> "$OUT/importtime-convert.txt" )
work=$(mktemp -d)
tar --exclude=./.git --exclude=./.whl --exclude=./.whl-dvc --exclude=./bench -cf - . | tar -xf - -C "$work"
(cd "$work" && OUT=$OUT timeout 480 bash benchmarks/stage_runs.sh startup "${ITERS:-4}" 2>&1 | grep -E '^\{|^\[(convert|merge)\]|rror' | tail -n 12)
