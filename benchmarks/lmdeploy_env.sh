#!/usr/bin/env bash
# LMDeploy's PyTorch engine in an environment of its own on the GPU host (the evaluate stage's
# eval.backend: lmdeploy runs it through $LMDEPLOY_PYTHON). XTuner 0.2.0 pins transformers 4.48;
# LMDeploy wants >= 4.56, which the host's own Python has (5.17, with torch 2.11 and triton 3.6).
# LMDeploy's wheel is 107 MB, 91 MB of it TurboMind built for CUDA 12, which the CUDA 13 host cannot
# load; the PyTorch engine needs none of it. So:
#   bash benchmarks/lmdeploy_env.sh collect         # here: ./.whl-lmdeploy/ (about 11 MB), TurboMind left out
#   bash benchmarks/lmdeploy_env.sh install DIR     # there: installs into DIR, writes DIR/python, the
#                                                   #   interpreter to name in LMDEPLOY_PYTHON
set -euo pipefail
VERSION=0.18.0
# what the host's Python lacks for `pipeline(..., PytorchEngineConfig())` (found by importing every
# module of the engine's path in an environment with the host's packages)
DEPS="mmengine==0.10.6 addict==2.4.0 yapf==0.43.0 termcolor==3.3.0 platformdirs==4.14.7 pybase64==1.5.1
  pyzmq==27.3.0 shortuuid==1.0.13 fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 h11==0.16.0 click==8.5.1
  pydantic==2.14.3 pydantic_core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5
  xgrammar==0.2.8 apache-tvm-ffi==0.1.15.post2 opentelemetry-api==1.45.2"
case ${1:-} in
  collect)
    dest=.whl-lmdeploy; tmp=$(mktemp -d); mkdir -p "$dest"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d "$tmp" "lmdeploy==$VERSION" $DEPS
    python3 - "$tmp" "$dest" <<'PY'
import shutil, sys, zipfile
from pathlib import Path
tmp, dest = Path(sys.argv[1]), Path(sys.argv[2])
for wheel in tmp.glob("*.whl"):
    if not wheel.name.startswith("lmdeploy-"):
        shutil.copy(wheel, dest / wheel.name); continue
    drop = lambda name: name.startswith("lmdeploy/turbomind/") and name.endswith((".so", ".a"))
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(dest / wheel.name, "w", zipfile.ZIP_DEFLATED) as out:
        for info in src.infolist():
            if drop(info.filename):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                data = b"".join(l for l in data.splitlines(True) if not drop(l.split(b",")[0].decode()))
            out.writestr(info, data)
    print(f"{wheel.name}: {wheel.stat().st_size / 1e6:.1f} MB -> {(dest / wheel.name).stat().st_size / 1e6:.1f} MB (no TurboMind)")
PY
    du -sh "$dest" ;;
  install)
    dir=${2:?usage: lmdeploy_env.sh install DIR}
    compgen -G ".whl-lmdeploy/lmdeploy-*.whl" >/dev/null || { echo "error: no .whl-lmdeploy/lmdeploy-*.whl here: run \`bash benchmarks/lmdeploy_env.sh collect\` first (and carry .whl-lmdeploy)" >&2; exit 1; }
    mkdir -p "$dir"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$dir/site" .whl-lmdeploy/*.whl
    printf '#!/bin/sh\n# LMDeploy over the host Python: its packages, none of the XTuner environment\'"'"'s\nPYTHONPATH=%s exec %s "$@"\n' \
      "$dir/site" "$(command -v python3)" > "$dir/python"
    chmod +x "$dir/python"; "$dir/python" -c "import lmdeploy, transformers, torch; print('lmdeploy', lmdeploy.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)" ;;
  *) sed -n 2,9p "$0"; exit 2 ;;
esac
