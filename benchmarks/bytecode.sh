# Sourced by the GPU benchmark scripts (stage_runs.sh, speed.sh): bytecode for every module the runs import, as
# `pip install` leaves it on a user's machine and `scripts/setup.sh` here. The GPU host runs Python with
# PYTHONDONTWRITEBYTECODE=1, its own packages (torch, triton, numpy) carry no bytecode, and the wheel kit goes in with
# --no-compile, so every process there compiled its imports anew: torch's took 7.5 s against 2.1 s with bytecode, a
# convert's or merge's 18.8 s against 7.5 s (results/h100/run10-startup/import_times.txt). That start-up is in every
# stage's wall time and in the scorer's start beside the trainer. BYTECODE=0: the host as it is (every call before
# this script ran so).
if [ "${BYTECODE:-1}" != 0 ]; then
  export PYTHONPYCACHEPREFIX=/tmp/pycache  # beside the read-only or foreign package folders, not in them
  unset PYTHONDONTWRITEBYTECODE
  if [ ! -f /tmp/pycache/.compiled ]; then
    _t0=$SECONDS
    # every package folder on the path (the host's, the wheel kit's, the peers'), then the project's own code
    python3 -c 'import sys; print("\n".join(p for p in sys.path[1:] if p.endswith(("site-packages", "dist-packages")) or p.startswith("/tmp/")))' \
      | while read -r dir; do [ -d "$dir" ] && echo "$dir"; done >/tmp/pycache-dirs.txt
    [ -d /tmp/peers ] && echo /tmp/peers >>/tmp/pycache-dirs.txt
    echo stages >>/tmp/pycache-dirs.txt; echo benchmarks >>/tmp/pycache-dirs.txt
    xargs -a /tmp/pycache-dirs.txt python3 -m compileall -q -j 0 >/dev/null 2>&1 || true  # a few files of some packages do not compile
    mkdir -p /tmp/pycache && touch /tmp/pycache/.compiled
    echo "bytecode: $(wc -l </tmp/pycache-dirs.txt) folders compiled into /tmp/pycache in $((SECONDS - _t0)) s" >&2
  fi
fi
