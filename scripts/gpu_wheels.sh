#!/usr/bin/env bash
# The GPU kit: the Python wheels the GPU machine lacks, collected into ./.whl (run from the project root).
# The GPU image has Python 3.12, torch 2.11+cu130, accelerate, safetensors, sentencepiece, tiktoken,
# numpy, pandas, pyarrow, matplotlib, tensorboard, einops, xxhash, fsspec, rich, tqdm, pillow, but not
# xtuner's pinned stack. With this set the whole pipeline ran there (README.md, "Measured on a GPU").
# Usage: bash scripts/gpu_wheels.sh [PYTHON]   (about 45 MB; PYTHON: an interpreter with torch, to build deepspeed)
# On the GPU host, with .whl carried:
#   python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#        bash scripts/gpu_wheels.sh --peers   (./.whl-peers, about 15 MB: Unsloth, Liger Kernel and what they need
#        beyond the GPU image, for benchmarks/peers.py; bitsandbytes comes from .whl)
set -euo pipefail
plat="--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
if [ "${1:-}" = --peers ]; then  # the versions measured beside the train stage (benchmarks/README.md)
  mkdir -p .whl-peers
  for spec in liger-kernel==0.8.5 unsloth==2026.10.9 unsloth_zoo==2026.10.9 trl==1.15.0 datasets==4.8.5 dill==0.4.1 \
              multiprocess==0.70.19 torchao==0.18.0 cut_cross_entropy==25.1.1 msgspec==0.23.0 tyro==1.0.17 \
              docstring_parser==0.18.0 typeguard==4.6.1 structlog==26.1.0 json5==0.17.3 nest_asyncio==1.6.0 \
              hf_transfer==0.1.9; do
    python3 -m pip download -q --no-deps --only-binary=:all: $plat -d .whl-peers "$spec"
  done
  for w in .whl-peers/unsloth-2*.whl; do zip -q -d "$w" 'studio/*' 2>/dev/null || true; done  # a web app, never imported
  du -sh .whl-peers
  exit 0
fi
py=${1:-python3}
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
for spec in xtuner==0.2.0 mmengine==0.10.6 transformers==4.48.0 "tokenizers>=0.21,<0.22" "huggingface_hub<1.0" \
            bitsandbytes==0.50.2 datasets==3.6.0 "dill<0.3.9" "multiprocess<0.70.17" loguru addict yapf platformdirs \
            termcolor hjson pydantic pydantic-core annotated-types typing-inspection peft==0.15.2 tomli \
            timm==1.0.31; do  # timm: InternViT's remote code imports it
  python3 -m pip download -q --no-deps --only-binary=:all: $plat -d .whl "$spec"
done
# bitsandbytes ships one library per CUDA version; keep the CPU and CUDA 13.0 ones (43 MB -> 4 MB).
for w in .whl/bitsandbytes-*.whl; do
  zip -q -d "$w" 'bitsandbytes/libbitsandbytes_cuda1[12]*' 'bitsandbytes/libbitsandbytes_cuda132.so' \
    'bitsandbytes/libbitsandbytes_rocm*' 'bitsandbytes/libbitsandbytes_xpu*' 2>/dev/null || true
done
# deepspeed and transformers-stream-generator are source-only on the index: build pure-Python wheels here.
tmp=$(mktemp -d)
python3 -m pip download -q --no-deps --no-binary=:all: -d "$tmp" deepspeed==0.16.2 transformers-stream-generator
DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps --no-build-isolation -w .whl "$tmp"/deepspeed-*.tar.gz
"$py" -m pip wheel -q --no-deps --no-build-isolation -w .whl "$tmp"/transformers*stream*.tar.gz
rm -rf "$tmp"
# DVC, DVCLive and the project's own needs beyond XTuner (jsonschema), minus what the GPU image has.
# antlr4-python3-runtime is source-only on the index: build its pure-Python wheel here.
for spec in dvc==3.67.1 dvclive==3.49.1 dvc-data==3.18.3 dvc-objects==5.2.0 dvc-render==1.0.2 dvc-studio-client==0.23.0 \
            dvc-task==0.40.2 dvc-http==2.32.0 aiohttp-retry==2.9.1 amqp==5.4.2 appdirs==1.4.4 asyncssh==2.24.1 \
            atpublic==9.0.0 billiard==4.3.2 celery==5.7.0 cffi==2.1.1 click-didyoumean==0.3.1 click-plugins==1.1.1.2 \
            click-repl==0.4.1 configobj==5.0.9 cryptography==50.0.2 dictdiffer==0.10.0 diskcache==5.6.3 distro==1.9.0 \
            dpath==2.2.0 dulwich==1.2.21 entrypoints==0.4.2 flatten-dict==0.5.0 flufl-lock==9.2.0 funcy==2.1 \
            gitdb==4.0.12 gitpython==3.2.1 grandalf==0.8 gto==1.10.1 hydra-core==1.3.8 iterative-telemetry==0.0.10 \
            kombu==5.7.0 omegaconf==2.3.1 orjson==3.13.0 pathspec==1.1.1 prompt-toolkit==3.0.53 pycparser==3.12 \
            pydantic-settings==2.16.3 pydot==4.0.1 pygit2==1.21.0 pygtrie==2.6.2 python-dotenv==1.2.4 \
            ruamel-yaml==0.19.1 scmrepo==3.6.2 semver==3.1.2 shortuuid==1.0.13 shtab==1.13.0 smmap==5.0.3 \
            sqltrie==0.11.3 tomlkit==0.15.2 tzlocal==5.4.5 vine==5.1.0 voluptuous==0.16.0 wcwidth==0.9.4 \
            zc-lockfile==4.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 \
            rpds-py==2026.9.1 et-xmlfile==2.0.0 openpyxl==3.1.5; do
  python3 -m pip download -q --no-deps --only-binary=:all: $plat -d .whl "$spec"
done
python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
du -sh .whl
