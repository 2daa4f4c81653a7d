#!/usr/bin/env bash
# One call to the GPU host: the llava recipe's whole DAG at real shapes, then the 1.8B text recipe's
# convert + merge after a short default training. Figures: $OUT/stage.jsonl (benchmarks/README.md).
#   OUT=bench [ITERS=20] bash benchmarks/gpu_llava_convert.sh [llava] [convert]
set -uo pipefail
OUT=$(realpath -m "${OUT:-bench}")
mkdir -p "$OUT" /tmp/models
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
base=$(mktemp -d)
tar --exclude=./.git --exclude=./.whl --exclude=./.whl-dvc --exclude=./bench -cf - . | tar -xf - -C "$base"
for suite in "${@:-llava convert}"; do
  for s in $suite; do
    work=$(mktemp -d) && cp -r "$base/." "$work/" && (cd "$work" && OUT=$OUT timeout 540 bash benchmarks/stage_runs.sh "$s" "${ITERS:-20}" 2>&1 \
      | grep -E '^\{|^\[(render|convert|merge)\]|rror' | tail -n 12)
  done
done
