#!/usr/bin/env bash
# Create .venv with the whole stack: torch first (pinned), then the project, XTuner 0.2.0 and its
# stack held by constraints.txt, then the two overrides XTuner's pins get wrong on these machines.
#
#   bash scripts/setup.sh                 # CPU: torch 2.13.0
#   TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu130" bash scripts/setup.sh
#   bash scripts/setup.sh --test          # also what the tests need outside Python (`make test`)
#
# Re-running is cheap: the installer (uv, else pip) skips what is already satisfied.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
start=$(date +%s)

[ -x .venv/bin/python ] || "$PY" -m venv .venv
# pip, without the "Location ... is ignored" lines some machines' pip.conf causes.
pip() {
  .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2>&1 \
    | { grep -v 'is ignored: it is neither a file nor a directory' || true; }
}

# The installer: uv where it can be had (SETUP_INSTALLER=pip: pip alone). uv resolves and installs the same
# pins several times faster; it lives in .venv/uv, beside the environment, not in it (no stage imports it).
# uv reads no pip.conf, so pip's configured sources (find-links, extra indexes, constraints: a machine's
# local wheels) are handed to it; it picks the best match over all indexes.
installer=pip
if [ "${SETUP_INSTALLER:-uv}" = uv ]; then
  [ -x .venv/uv/bin/uv ] || pip install --target .venv/uv uv >/dev/null 2>&1 || rm -rf .venv/uv
  if [ -x .venv/uv/bin/uv ]; then
    installer=uv
    uv_args=(--python .venv/bin/python --index-strategy unsafe-best-match)
    # Bytecode for every installed module (as pip writes it) for `make repro`: where PYTHONDONTWRITEBYTECODE is
    # set (the CI machine), Python never writes it, and each stage would compile its imports again. `make test`
    # (--test) skips it: the suite lets Python write the bytecode of what its processes import, on first import
    # (tests/conftest.py), which is a fraction of what is installed (26 s of the 47 s setup on a 2-core AMD EPYC).
    [ "${1:-}" = --test ] || uv_args+=(--compile-bytecode)
    while IFS= read -r line; do  # pip config list: scope.key='value', the environment's last
      key=${line%%=*}; key=${key##*.}; value=${line#*=}; value=${value#\'}; value=${value%\'}
      for v in $value; do
        case $key in
          find-links) uv_args+=(--find-links "$v") ;;
          extra-index-url) uv_args+=(--extra-index-url "$v") ;;
          index-url) uv_args+=(--index-url "$v") ;;
          constraint) uv_args+=(--constraint "$v") ;;
        esac
      done
    done < <(.venv/bin/python -m pip config list 2>/dev/null || true)
  fi
fi
install() {
  if [ $installer = uv ]; then .venv/uv/bin/uv pip install -q "${uv_args[@]}" "$@"; else pip install "$@"; fi
}

# What is installed, by the packages' metadata (importing torch and deepspeed to ask costs 25 s).
version() { .venv/bin/python -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$1" 2>/dev/null || true; }

# 1. torch, then hold it: without this pin, resolving torchvision pulls a newer torch with CUDA (GBs).
[ -n "$(version torch)" ] || install $TORCH_SPEC
torch_version=$(version torch); torch_version=${torch_version%%+*}
{ cat constraints.txt; echo "torch==$torch_version"; } > .venv/constraints.txt

# 2. deepspeed is source-only on the index; build it without ops (they are built just in time on GPU).
[ -n "$(version deepspeed)" ] || DS_BUILD_OPS=0 install --no-build-isolation -c .venv/constraints.txt deepspeed==0.16.2

# 3. the project, XTuner and the rest (with --test also the web demo's Gradio and the tests' Selenium);
#    skipped when pyproject.toml, the constraints and the extras are those of the last complete run
#    (.venv/setup.stamp), as re-resolving would swap bitsandbytes back and forth (step 4).
extras=dev; [ "${1:-}" != --test ] || extras=dev,web
stamp=$( { cat pyproject.toml .venv/constraints.txt; echo "$extras"; } | sha256sum | cut -d' ' -f1)
if [ "$(cat .venv/setup.stamp 2>/dev/null)" != "$stamp" ] || [ -z "$(version xtuner-dvc-pipeline)" ]; then
  rm -f .venv/setup.stamp
  install -c .venv/constraints.txt -e ".[$extras]"
fi

# 4. Override: bitsandbytes 0.50.2 over xtuner 0.2.0's bitsandbytes==0.45.0 pin. 0.45.0 has no CPU
#    4-bit kernels and no CUDA 13 library; 0.50.2 has both. pip's check reports the pin conflict;
#    nothing else depends on it.
[ "$(version bitsandbytes)" = 0.50.2 ] || install --no-deps bitsandbytes==0.50.2
echo "$stamp" > .venv/setup.stamp

# 5. `make test` only (--test): tests/test_remote_ssh.py runs its own OpenSSH server on loopback. Where
#    /usr/sbin/sshd is missing and apt-get can install it (CI: a clean Debian machine, as root), install
#    openssh-server; a policy-rc.d that exits 101 keeps the system service from being started.
if [ "${1:-}" = --test ] && [ ! -x /usr/sbin/sshd ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  policy=/usr/sbin/policy-rc.d
  log=$(mktemp)
  [ -e $policy ] || { printf '#!/bin/sh\nexit 101\n' > $policy; chmod +x $policy; trap "rm -f $policy" EXIT; }
  if ! { apt-get -qq update && DEBIAN_FRONTEND=noninteractive apt-get -qq install -y --no-install-recommends \
           openssh-server; } >"$log" 2>&1; then
    tail -n 20 "$log" >&2
    echo "setup: installing openssh-server failed (log: $log)" >&2
    exit 1
  fi
  rm -f "$log"
  echo "setup: installed openssh-server (for tests/test_remote_ssh.py)"
fi

# 6. `make test` only (--test): tests/test_chat.py drives the web demo in a headless Chromium through
#    Debian's chromedriver (Selenium Manager then downloads nothing), with a CJK font for its screenshot.
if [ "${1:-}" = --test ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  missing=()
  [ -x /usr/bin/chromium ] || missing+=(chromium)
  [ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
  fc-list 2>/dev/null | grep -qi 'wqy\|noto sans cjk' || missing+=(fonts-wqy-zenhei)
  if [ ${#missing[@]} -gt 0 ]; then
    log=$(mktemp)
    if ! { apt-get -qq update && DEBIAN_FRONTEND=noninteractive apt-get -qq install -y --no-install-recommends \
             "${missing[@]}"; } >"$log" 2>&1; then
      tail -n 20 "$log" >&2
      echo "setup: installing ${missing[*]} failed (log: $log)" >&2
      exit 1
    fi
    rm -f "$log"
    echo "setup: installed ${missing[*]} (for tests/test_chat.py)"
  fi
fi

echo "setup: .venv ready in $(( $(date +%s) - start ))s (torch $torch_version, $installer)"
