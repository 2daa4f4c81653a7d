#!/usr/bin/env bash
# The train stage beside what users run instead, in one call to the GPU machine, on the same shapes:
# Unsloth, transformers + peft + Liger Kernel, plain transformers + peft (benchmarks/peers.py, on
# the InternLM2 shape as a Llama model, on the GPU image's own transformers), then the project's
# real train stage (`dvc repro train`, XTuner's trainer) on the InternLM2 remote-code structure.
# One JSON line a measurement in $OUT/speed.jsonl; `python -m benchmarks.speed_report FILE` makes the table.
#
#   bash scripts/gpu_wheels.sh .venv/bin/python && bash scripts/gpu_wheels.sh --peers   # here: .whl, .whl-peers
#   # there, with .whl installed into /tmp/site and on PYTHONPATH (benchmarks/README.md):
#   OUT=bench bash benchmarks/speed.sh [SUITE] [ITERS]
#
# Suites: peers (the three libraries at micro-batch 8 and 16, plain also 4), stage (the train stage
# at the project's defaults at `train.memory_gb: 24`, LoRA as the peers': r 64, alpha 16, dropout 0),
# profile (the default at 24 GB: the train stage's iterations and levers.py's bare model, both profiled),
# levers (benchmarks/levers.py's `stage` plan on the built model, the last setting profiled), cudagraphs
# (levers.py's default, then the same with CUDA graphs, both profiled), host (the train stage with
# its default `train.cuda_graphs`, Unsloth, then the stage without it), graphs (the stage with `train.cuda_graphs`,
# torch's recompile and cudagraph logs), long (the same and the defaults over a run with checkpoints and
# chats: ITERS 160), overhead
# (the optimizer wrapper's per-step levers in the train stage, each undone on its own),
# all (peers, then the stage at 24 GB with the peers' LoRA and with dropout 0.1), lean7b (7B: the peers at micro-batch 1 and 2, the stage at memory_gb 8,
# and with train.offload_activations at micro-batch 2), offload (train.offload_activations at micro-batch 16 beside Unsloth's),
# frontier (the default, Unsloth at 4, 8 and 16, and the offload suite's two runs: tokens/s against peak),
# packing (the pack length alone: 2048, 1024 and 4096 tokens a sequence at the same tokens a step),
# fp8 (train.fp8: Unsloth at 16, the default without and with it, then the frozen products alone),
# lean7b-fp8 (Unsloth's 7B at micro-batch 1, the stage at memory_gb 8 with train.fp8, offloaded at 2, then plain),
# lean7b-fp8-lever (Unsloth's 7B at 1 twice, the stage offloaded at 2 without and with train.fp8),
# offload-fp8 (Unsloth at 16, then micro-batch 16 with every layer checkpointed and offloaded, with and without train.fp8),
# loss (Unsloth at 16, the default, the same with the loss's chunk math as written, the default again, with train.fp8),
# tiles (the MLPs in slices: 4, the planner's 2 and none with train.fp8, 4 in bf16, in Unsloth's regime beside it),
# memory (where the peak goes, benchmarks/stage_memory.py: Unsloth at 16, then its regime with train.fp8 and in bf16),
# profile-lean (Unsloth's regime with train.fp8 and the MLP in slices, its iterations profiled),
# overlap-lean (no wait at an iteration's end in Unsloth's regime, with and without, beside Unsloth at 16),
# lean8 (the 1.8B shape at memory_gb 8: the planner's plan, then Unsloth's regime),
# rope (InternLM2's cos and sin from a table, without and with, then with inductor's coordinate-descent tuning, in
# Unsloth's regime with train.fp8, beside Unsloth at 16), reductions (the same with inductor's multi-kernel row
# reductions, then with coordinate-descent tuning too), tuned (train.tune_kernels in Unsloth's regime with train.fp8,
# then the default at 24 GB with it, beside Unsloth at 16), tuned-again (the first of those twice in a row),
# unsloth-best (Unsloth at micro-batch 16, 24 and 32), profile-tuned (profile-lean with the rotary table and
# train.tune_kernels), fast-accum (the float8 products with fast accumulation: without, forward, forward and backward,
# in Unsloth's regime, beside Unsloth at 16, 24 and 32), fast-tuned (fast accumulation with train.tune_kernels in
# Unsloth's regime, then the default at 24 GB with both, beside Unsloth at 16 and 24), fast-again (the frozen products
# alone with and without fast accumulation, then fast-tuned),
# loss-kernels (the loss head alone: the stage's fused loss as written and compiled beside Liger Kernel's and
# cut-cross-entropy's).
set -uo pipefail
SUITE=${1:-all}; ITERS=${2:-40}; OUT=${OUT:-bench}
mkdir -p "$OUT" /tmp/models
RESULTS=$(realpath "$OUT")/speed.jsonl
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 \
  UNSLOTH_DISABLE_STATISTICS=1 DO_NOT_TRACK=1 TOKENIZERS_PARALLELISM=false
XTUNER_SITE=${PYTHONPATH:-/tmp/site}
[ -d /tmp/peers ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/peers \
  .whl-peers/*.whl .whl/bitsandbytes-*.whl >"$OUT/peers-install.log" 2>&1 || { tail -n 5 "$OUT/peers-install.log"; exit 1; }
TINY_TEXT=$(mktemp -d)/tokenizer && cp -r models/assistant/llm "$TINY_TEXT"
source benchmarks/bytecode.sh  # as a user's install has it (BYTECODE=0: the host as it is)

model() {  # shape, arch, [--plain-tokenizer]: a random model of that shape under /tmp/models
  local dir=/tmp/models/$1-$2${3:+-plain}
  [ -d "$dir" ] || PYTHONPATH=$XTUNER_SITE python3 scripts/random_model.py "$1" "$dir" --arch "$2" \
    --tokenizer "$TINY_TEXT" ${3:-} | tail -n 1 >&2
  echo "$dir"
}
peer() {  # lib, shape, micro-batches
  local dir; dir=$(model "$2" llama --plain-tokenizer)
  echo "== peer $1 $2 micro-batches $3 at +${SECONDS}s"
  PYTHONPATH=/tmp/peers timeout -k 5 240 python3 -m benchmarks.peers --lib "$1" --model "$dir" --shape "$2" \
    --mbs "$3" --out "$RESULTS" >"$OUT/peer-$1-$2.log" 2>&1 || { echo "peer $1 failed"; tail -n 8 "$OUT/peer-$1-$2.log"; }
  grep -h '"run": "peer"' "$OUT/peer-$1-$2.log" | cut -c1-300
}
free_disk() {  # keep: the one model under /tmp/models to keep. The train stage's preflight asks for 3x its model
  # free (a merged copy and checkpoints): 7B needs 44 GB of the 64 GB disk, so the other shapes' models (the peers'
  # 7B copy is 15 GB) and a warm machine's leftovers go first
  find /tmp/models -mindepth 1 -maxdepth 1 ! -name "$1" -exec rm -rf {} + 2>/dev/null; true
}
stage() {  # name, shape, params updates: the train stage through `dvc repro train`, figures into $RESULTS
  local dir; dir=$(model "$2" internlm2)
  echo "== stage $1 at +${SECONDS}s"
  OUT=$OUT/stage STAGE_MODEL=$dir ITERS=$ITERS bash benchmarks/stage_runs.sh speed-stage "$ITERS" "$1" "$3" \
    >>"$OUT/stage.log" 2>&1 || { echo "stage failed"; tail -n 15 "$OUT/stage.log"; }
  cp reports/train/xtuner.log "$OUT/xtuner-$(echo "$1" | tr -c 'a-zA-Z0-9\n' '_').log" 2>/dev/null
  tail -n 1 "$OUT/stage/stage.jsonl" 2>/dev/null | python3 -c "
import json, sys
for line in sys.stdin:
    rec = json.loads(line); rec['shape'] = '$2'; open('$RESULTS', 'a').write(json.dumps(rec) + '\n')
    print({k: rec.get(k) for k in ('run', 'status', 'tokens_per_s', 'peak_gb', 'stage_wall_s')})"
}
levers() {  # shape, plan
  local dir; dir=$(model "$1" internlm2)
  echo "== levers $2 at +${SECONDS}s"
  PYTHONPATH=$XTUNER_SITE timeout -k 5 420 python3 -m benchmarks.levers "$dir" --shape "$1" --plan "$2" \
    --out "$RESULTS" --profile "$OUT/profile-$2.txt" >"$OUT/levers-$2.log" 2>&1 || { echo "levers failed"; tail -n 15 "$OUT/levers-$2.log"; }
  grep -h '^{' "$OUT/levers-$2.log" | cut -c1-400
}
PEERLORA="'lora': {'r': 64, 'alpha': 16, 'dropout': 0.0}"
# Unsloth's regime: micro-batch 16, every layer checkpointed and offloaded (the MLP in the planner's slices)
UNSLOTH16="'memory_gb': 40, 'micro_batch': 16, 'activation_checkpointing': True, 'offload_activations': True"
# the train stage's parameters in that regime with train.fp8 (the usual setting of the suites below), and its runs' name
LEAN_FP8="{$PEERLORA, 'train': {$UNSLOTH16, 'fp8': True}}"
LEAN_TUNED="{$PEERLORA, 'train': {$UNSLOTH16, 'fp8': True, 'tune_kernels': True}}"
LEAN_NAME="train stage, micro-batch 16, every layer checkpointed, offloaded, peer LoRA"
# the float8 products without fast accumulation (both, the backward's: pipeline keys on with train.fp8): CONFIG_EDITs
FAST_NONE="s/'fp8_fast_accum': True, 'fp8_fast_accum_grad': True/'fp8_fast_accum': False, 'fp8_fast_accum_grad': False/"
FAST_FORWARD="s/'fp8_fast_accum_grad': True/'fp8_fast_accum_grad': False/"
# benchmarks/stage_profile.py's hooks added to the rendered config (CONFIG_EDIT): the stage's iterations profiled
PROFILE_HOOK="s/^custom_hooks = \\[\$/from benchmarks.stage_profile import StageEdges, StageProfile\\ncustom_hooks = [dict(type=StageEdges), dict(type=StageProfile),/"
checkpointed16() {  # micro-batch 16, every layer checkpointed, without and with train.offload_activations
  local every="'memory_gb': 40, 'micro_batch': 16, 'activation_checkpointing': True"
  stage "train stage, micro-batch 16, every layer checkpointed, peer LoRA" internlm2-1_8b "{$PEERLORA, 'train': {$every}}"
  stage "$LEAN_NAME" internlm2-1_8b \
    "{$PEERLORA, 'train': {$every, 'offload_activations': True}}"
}
lean7b_offloaded() {  # LEAN7B_MB: its micro-batch (2; a divisor of the global batch, 16); LEAN7B_FP8=1: with train.fp8
  local mb=${LEAN7B_MB:-2} fp8="${LEAN7B_FP8:+, 'fp8': True}"
  stage "train stage, lean (8 GB), peer LoRA, offloaded checkpoints, micro-batch $mb${LEAN7B_FP8:+, train.fp8}" 7b \
    "{$PEERLORA, 'train': {'memory_gb': 8, 'optimizer': 'paged_adamw8bit', 'offload_activations': True, 'micro_batch': $mb$fp8}}"
}
fast_tuned() {  # the fast-tuned suite (below): Unsloth at 16 and 24, then the tuned runs with fast accumulation
  [ -n "${NO_PEER:-}" ] || peer unsloth internlm2-1_8b 16,24
  stage "$LEAN_NAME, train.fp8, train.tune_kernels, fast accumulation forward and backward" internlm2-1_8b "$LEAN_TUNED"
  stage "train stage, defaults at 24 GB, peer LoRA, train.fp8, train.tune_kernels, fast accumulation forward and backward" \
    internlm2-1_8b "{$PEERLORA, 'train': {'memory_gb': 24, 'fp8': True, 'tune_kernels': True}}"
}
case $SUITE in
  peers) peer unsloth internlm2-1_8b 8,16; peer liger internlm2-1_8b 8,16; peer hf internlm2-1_8b 4,8 ;;
  stage) stage "train stage, defaults at 24 GB, peer LoRA" internlm2-1_8b "{$PEERLORA}" ;;
  levers) levers internlm2-1_8b stage ;;
  all)
    peer unsloth internlm2-1_8b 8,16; peer liger internlm2-1_8b 8,16; peer hf internlm2-1_8b 4,8
    stage "train stage, defaults at 24 GB, peer LoRA" internlm2-1_8b "{$PEERLORA}"
    stage "train stage, defaults at 24 GB, LoRA dropout 0.1" internlm2-1_8b "{'lora': {'r': 64, 'alpha': 16, 'dropout': 0.1}}" ;;
  overhead)  # the per-step levers of the optimizer wrapper, each undone on its own in the rendered config:
    # mmengine's dynamic loss scaling under bf16 (a scale, an unscale, an overflow check and a sync a step)
    # and torch's fused AdamW; then data loading in two worker processes
    NOSCALE="/^    loss_scale={'enabled': False},\$/d"; NOFUSE="s/, fused=True)/)/"
    CONFIG_EDIT="$NOSCALE;$NOFUSE" stage "train stage, peer LoRA, dynamic loss scale, foreach AdamW (before)" internlm2-1_8b "{$PEERLORA}"
    stage "train stage, peer LoRA, no loss scale, fused AdamW (defaults)" internlm2-1_8b "{$PEERLORA}"
    CONFIG_EDIT="$NOSCALE" stage "train stage, peer LoRA, dynamic loss scale, fused AdamW" internlm2-1_8b "{$PEERLORA}"
    CONFIG_EDIT="$NOFUSE" stage "train stage, peer LoRA, no loss scale, foreach AdamW" internlm2-1_8b "{$PEERLORA}"
    CONFIG_EDIT="s/^dataloader_num_workers = 0\$/dataloader_num_workers = 2/" \
      stage "train stage, peer LoRA, defaults, 2 data-loading workers" internlm2-1_8b "{$PEERLORA}" ;;
  profile)  # the default at 24 GB profiled twice: the train stage's iterations 20-23 (stage_profile.py, a hook
    # added to the rendered config) and levers.py's bare model (its step: one micro-batch and the optimizer)
    # STAGE_PROFILE_BARE=N (stage_profile.py): N bare steps in the stage's own process first, to tell the
    # process's cost per op from the loop's
    STAGE_PROFILE_BARE=${STAGE_PROFILE_BARE:-10} STAGE_PROFILE_OUT=$(realpath "$OUT")/stage-profile.jsonl CONFIG_EDIT="$PROFILE_HOOK" \
      stage "train stage, defaults at 24 GB, peer LoRA, profiled" internlm2-1_8b "{$PEERLORA}"
    cat "$OUT/stage-profile.jsonl" 2>/dev/null || grep -h "profile\|Error" "$OUT"/stage/*.log | tail -n 5
    [ -n "${STAGE_ONLY:-}" ] || levers internlm2-1_8b default ;;
  host)  # the host ahead of the GPU (train.cuda_graphs, the default: stages/kernels.py CUDA graphs and
    # stages/overlap.py), beside Unsloth, then without it; HOST_ALL=1: CUDA graphs without the overlap hook too
    stage "train stage, defaults at 24 GB, peer LoRA (train.cuda_graphs)" internlm2-1_8b "{$PEERLORA}"
    peer unsloth internlm2-1_8b 8,16
    stage "train stage, defaults at 24 GB, peer LoRA, cuda_graphs false" internlm2-1_8b "{$PEERLORA, 'train': {'cuda_graphs': False}}"
    [ -z "${HOST_ALL:-}" ] || CONFIG_EDIT="/Overlap)\|pin_memory=True/d" \
      stage "train stage, defaults at 24 GB, peer LoRA, CUDA graphs without the overlap hook" internlm2-1_8b \
      "{$PEERLORA, 'train': {'cuda_graphs': True}}" ;;
  long)  # train.cuda_graphs against the defaults over a run with checkpoints and chats (ITERS 160: 8 checkpoints, a chat
    # every 50 iterations of 48 new tokens, no scorer beside), the defaults, the graphs again (the first run pays
    # torch.compile cold); XTuner's 10-iteration windows in
    # $OUT/xtuner-*.log show which windows (a checkpoint's, a chat's) cost what with and without the graphs
    LONG="'eval': {'interval': 50, 'max_new_tokens': 48}, 'select': {'during_training': False}"
    EVERY=$((ITERS / 8))
    stage "train stage, $ITERS iterations, 8 checkpoints, chats, train.cuda_graphs" internlm2-1_8b \
      "{$PEERLORA, $LONG, 'train': {'cuda_graphs': True, 'save_interval': $EVERY}}"
    stage "train stage, $ITERS iterations, 8 checkpoints, chats" internlm2-1_8b \
      "{$PEERLORA, $LONG, 'train': {'cuda_graphs': False, 'save_interval': $EVERY}}"
    stage "train stage, $ITERS iterations, 8 checkpoints, chats, train.cuda_graphs, again" internlm2-1_8b \
      "{$PEERLORA, $LONG, 'train': {'cuda_graphs': True, 'save_interval': $EVERY}}" ;;
  graphs)  # train.cuda_graphs with torch's recompile and cudagraph logs ($OUT/stage/*.log), then the same without
    # the overlap hook; XTuner's per-interval iteration times in $OUT/xtuner-*.log
    export TORCH_LOGS="recompiles,cudagraphs,perf_hints"
    stage "train stage, defaults at 24 GB, peer LoRA, train.cuda_graphs, logged" internlm2-1_8b "{$PEERLORA, 'train': {'cuda_graphs': True}}"
    CONFIG_EDIT="/Overlap)\|pin_memory=True/d" stage "train stage, defaults at 24 GB, peer LoRA, CUDA graphs without the overlap hook, logged" \
      internlm2-1_8b "{$PEERLORA, 'train': {'cuda_graphs': True}}" ;;
  cudagraphs)  # levers.py's default at 24 GB with its compiled layers replayed as CUDA graphs, beside plain compiled
    levers internlm2-1_8b default; levers internlm2-1_8b cudagraphs ;;
  lean7b)  # UNSLOTH_ONLY=1: Unsloth alone of the peers (the target's; the 7B model files take a minute each)
    peer unsloth 7b 1,2; [ -n "${UNSLOTH_ONLY:-}" ] || { peer liger 7b 1,2; peer hf 7b 1; }
    free_disk 7b-internlm2
    stage "train stage, lean (8 GB), peer LoRA" 7b "{$PEERLORA, 'train': {'memory_gb': 8, 'optimizer': 'paged_adamw8bit'}}"
    lean7b_offloaded ;;
  lean7b-offloaded) lean7b_offloaded ;;  # that last run alone
  offload)  # train.offload_activations at Unsloth's setting (micro-batch 16, every layer checkpointed) beside it
    # and beside the same without offloading, on the 1.8B shape
    checkpointed16
    [ -n "${NO_PEER:-}" ] || peer unsloth internlm2-1_8b 16 ;;
  frontier)  # tokens/s against peak memory: the default at 24 GB (train.cuda_graphs), Unsloth at micro-batch 4, 8
    # and 16 (the default's micro-batch and the peers' two), then micro-batch 16 with every layer checkpointed,
    # without and with offloading (the offload suite's two runs), all in one call
    stage "train stage, defaults at 24 GB, peer LoRA (train.cuda_graphs)" internlm2-1_8b "{$PEERLORA}"
    peer unsloth internlm2-1_8b 4,8,16
    checkpointed16 ;;
  packing)  # the pack length on its own: sequences of 2048 (the default), 1024 and 4096 tokens, with the same
    # tokens per micro-batch (8,192) and per optimizer step (32,768), the planner's other choices as they come
    for len in 2048 1024 4096; do
      mb=$((8192 / len)); gb=$((32768 / len))
      stage "train stage, defaults at 24 GB, peer LoRA, packed to $len (micro-batch $mb, global batch $gb)" internlm2-1_8b \
        "{$PEERLORA, 'data': {'max_length': $len}, 'train': {'micro_batch': $mb, 'global_batch': $gb}}"
    done ;;
  fp8)  # train.fp8 (stages/fp8.py): Unsloth at micro-batch 16 (its best), the default at 24 GB without and with
    # train.fp8, with it at 21 GB (float8 weights not kept), then the frozen products alone (benchmarks/fp8_matmul.py,
    # 1.8B shapes; FP8_MATMUL=0 skips them)
    [ -n "${NO_PEER:-}" ] || peer unsloth internlm2-1_8b 16
    stage "train stage, defaults at 24 GB, peer LoRA" internlm2-1_8b "{$PEERLORA}"
    stage "train stage, defaults at 24 GB, peer LoRA, train.fp8" internlm2-1_8b "{$PEERLORA, 'train': {'fp8': True}}"
    # 21 GB: the same plan (estimated 20.2 GB), the kept float8 weights (21.7) do not fit: the backward dequantises again
    stage "train stage, 21 GB, peer LoRA, train.fp8, weights not kept" internlm2-1_8b \
      "{$PEERLORA, 'train': {'fp8': True, 'memory_gb': 21}}"
    [ "${FP8_MATMUL:-1}" = 0 ] || PYTHONPATH=$XTUNER_SITE timeout -k 5 180 python3 -m benchmarks.fp8_matmul \
      --out "$RESULTS" --shapes "1.8B wqkv,1.8B wo,1.8B w1/w3,1.8B w2" 2>"$OUT/fp8-matmul.log" | cut -c1-220 ;;
  lean7b-fp8)  # the 7B target with train.fp8: Unsloth at micro-batch 1 (the only one within 8 GiB), then the stage
    # at memory_gb 8 with train.fp8, with offload_activations at micro-batch 2 (the best within 8 GB before), then plain
    peer unsloth 7b 1
    free_disk 7b-internlm2
    LEAN7B_FP8=1 lean7b_offloaded
    stage "train stage, lean (8 GB), peer LoRA, train.fp8" 7b \
      "{$PEERLORA, 'train': {'memory_gb': 8, 'optimizer': 'paged_adamw8bit', 'fp8': True}}" ;;
  lean7b-fp8-lever)  # train.fp8 on its own at 7B: Unsloth at micro-batch 1 twice (its spread within a call), then the
    # stage's best within 8 GB (offloaded, micro-batch 2) without and with train.fp8
    peer unsloth 7b 1; peer unsloth 7b 1
    free_disk 7b-internlm2
    lean7b_offloaded; LEAN7B_FP8=1 lean7b_offloaded ;;
  offload-fp8)  # Unsloth's memory regime with train.fp8: micro-batch 16, every layer checkpointed, offloaded, with and
    # without train.fp8 (a checkpointed layer keeps no float8 weights), beside Unsloth at 16 (7.58 GB before);
    # OFFLOAD_GB: train.memory_gb (40; at 8 the planner cuts the loss into chunks of 256 tokens, not 1,024)
    [ -n "${NO_PEER:-}" ] || peer unsloth internlm2-1_8b 16
    gb=${OFFLOAD_GB:-40}; at=${OFFLOAD_GB:+, memory_gb $OFFLOAD_GB}
    every="'memory_gb': $gb, 'micro_batch': 16, 'activation_checkpointing': True, 'offload_activations': True"
    stage "$LEAN_NAME, train.fp8$at" internlm2-1_8b \
      "{$PEERLORA, 'train': {$every, 'fp8': True}}"
    stage "$LEAN_NAME$at" internlm2-1_8b \
      "{$PEERLORA, 'train': {$every}}" ;;
  tiles)  # the MLPs in slices of tokens (`tile_mlp`) on their own, in Unsloth's regime (micro-batch 16, every layer
    # checkpointed and offloaded) with train.fp8: 4 slices, the planner's 2, none (as before), then 4 in bf16 (the
    # 2026-12-04 call, when the planner's were 4; its bf16 run ran out of time); beside Unsloth at 16
    [ -n "${NO_PEER:-}" ] || peer unsloth internlm2-1_8b 16
    for tiles in 4 2 0; do
      CONFIG_EDIT=$([ "$tiles" = 2 ] || echo "s/'tile_mlp': 2/'tile_mlp': $tiles/") stage \
        "$LEAN_NAME, train.fp8, MLP in $tiles slices" \
        internlm2-1_8b "$LEAN_FP8"
    done
    CONFIG_EDIT="s/'tile_mlp': 2/'tile_mlp': 4/" stage \
      "$LEAN_NAME, MLP in 4 slices" internlm2-1_8b \
      "{$PEERLORA, 'train': {$UNSLOTH16}}" ;;
  loss)  # the fused loss's chunk math compiled (`compile_loss`, with compiled layers), on its own: Unsloth at 16, the
    # default at 24 GB, the same with the loss as written (the rendered config's compile_loss undone), the default
    # again (the spread within a call), then with train.fp8
    [ -n "${NO_PEER:-}" ] || peer unsloth internlm2-1_8b 16
    stage "train stage, defaults at 24 GB, peer LoRA, loss compiled" internlm2-1_8b "{$PEERLORA}"
    CONFIG_EDIT="s/'compile_loss': True/'compile_loss': False/" \
      stage "train stage, defaults at 24 GB, peer LoRA, loss as written (before)" internlm2-1_8b "{$PEERLORA}"
    stage "train stage, defaults at 24 GB, peer LoRA, loss compiled, again" internlm2-1_8b "{$PEERLORA}"
    [ -n "${NO_FP8:-}" ] || stage "train stage, defaults at 24 GB, peer LoRA, loss compiled, train.fp8" internlm2-1_8b \
      "{$PEERLORA, 'train': {'fp8': True}}" ;;
  memory)  # where the peak goes (benchmarks/stage_memory.py: the allocator's history over one step, the live blocks at
    # its peak by the code that made them), in Unsloth's regime with train.fp8 (0.47 GB over Unsloth), then in bf16,
    # after Unsloth at micro-batch 16 (NO_PEER=1: without it)
    [ -n "${NO_PEER:-}" ] || peer unsloth internlm2-1_8b 16
    HOOK="s/^custom_hooks = \\[\$/from benchmarks.stage_memory import StageMemory\\ncustom_hooks = [dict(type=StageMemory),/"
    STAGE_MEMORY_OUT=$(realpath "$OUT")/stage-memory.jsonl CONFIG_EDIT="$HOOK" stage \
      "$LEAN_NAME, train.fp8, memory recorded" \
      internlm2-1_8b "$LEAN_FP8"
    # in bf16 too (not the default at 24 GB: its CUDA graphs allocate from a pool of their own, which the history
    # sees as one block made before it began)
    STAGE_MEMORY_OUT=$(realpath "$OUT")/stage-memory.jsonl CONFIG_EDIT="$HOOK" stage \
      "$LEAN_NAME, memory recorded" \
      internlm2-1_8b "{$PEERLORA, 'train': {$UNSLOTH16}}"
    python3 -m benchmarks.stage_memory "$OUT/stage-memory.jsonl" ;;
  overlap-lean)  # no wait for the GPU at an iteration's end (stages/overlap.py) on its own, in Unsloth's regime (micro-batch
    # 16, every layer checkpointed and offloaded, the MLP in 2 slices), where it was off before: with train.fp8 with it,
    # without it (the hook taken out of the rendered config), then bf16 with it; beside Unsloth at 16
    [ -n "${NO_PEER:-}" ] || peer unsloth internlm2-1_8b 16
    name="$LEAN_NAME"
    stage "$name, train.fp8, no wait at an iteration's end" internlm2-1_8b "$LEAN_FP8"
    CONFIG_EDIT="/^    dict(type=Overlap),\$/d" \
      stage "$name, train.fp8, waits (before)" internlm2-1_8b "$LEAN_FP8"
    stage "$name, no wait at an iteration's end" internlm2-1_8b "{$PEERLORA, 'train': {$UNSLOTH16}}" ;;
  lean8)  # the 1.8B shape at `memory_gb: 8` in bf16: the planner's own plan (micro-batch 4, the first 19 layers
    # checkpointed), then micro-batch 16 with every layer checkpointed and offloaded (Unsloth's regime, the MLP in 2 slices)
    stage "train stage, 8 GB, peer LoRA, the planner's plan" internlm2-1_8b "{$PEERLORA, 'train': {'memory_gb': 8}}"
    stage "train stage, 8 GB, peer LoRA, micro-batch 16, every layer checkpointed, offloaded" internlm2-1_8b \
      "{$PEERLORA, 'train': {'memory_gb': 8, 'micro_batch': 16, 'activation_checkpointing': True, 'offload_activations': True}}" ;;
  profile-lean)  # Unsloth's regime (micro-batch 16, every layer checkpointed and offloaded, the MLP in the planner's 2
    # slices) with train.fp8, profiled: the train stage's iterations 20-23 (stage_profile.py), where its GPU time goes
    STAGE_PROFILE_BARE=0 STAGE_PROFILE_OUT=$(realpath "$OUT")/stage-profile.jsonl CONFIG_EDIT="$PROFILE_HOOK" stage \
      "$LEAN_NAME, train.fp8, profiled" internlm2-1_8b \
      "$LEAN_FP8"
    cat "$OUT/stage-profile.jsonl" 2>/dev/null || grep -h "profile\|Error" "$OUT"/stage/*.log | tail -n 5 ;;
  rope)  # InternLM2's cos and sin from a table (`rope_table`) on their own, in Unsloth's regime with train.fp8 and the
    # MLP in 2 slices: the table taken out of the rendered config (before), with it, and with it and inductor's
    # coordinate-descent tuning of its kernels' launch settings (TORCHINDUCTOR_COORDINATE_DESCENT_TUNING); beside Unsloth
    [ -n "${NO_PEER:-}" ] || peer unsloth internlm2-1_8b 16
    name="$LEAN_NAME, train.fp8"
    CONFIG_EDIT="s/'rope_table': True/'rope_table': False/" \
      stage "$name, cos and sin computed in every layer (before)" internlm2-1_8b "$LEAN_FP8"
    stage "$name, cos and sin from a table" internlm2-1_8b "$LEAN_FP8"
    TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 \
      stage "$name, cos and sin from a table, coordinate-descent tuning" internlm2-1_8b "$LEAN_FP8" ;;
  reductions)  # inductor's kernels for the row reductions (the float8 scaling's maxima over 2,048-8,192 columns) in
    # Unsloth's regime with train.fp8: as they are (a loop that reads its inputs twice), with multi-kernel (a persistent
    # variant too, kept where it is faster: TORCHINDUCTOR_MULTI_KERNEL), and with it and coordinate-descent tuning
    [ -n "${NO_PEER:-}" ] || peer unsloth internlm2-1_8b 16
    name="$LEAN_NAME, train.fp8"
    stage "$name" internlm2-1_8b "$LEAN_FP8"
    TORCHINDUCTOR_MULTI_KERNEL=1 stage "$name, multi-kernel" internlm2-1_8b "$LEAN_FP8"
    TORCHINDUCTOR_MULTI_KERNEL=1 TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 \
      stage "$name, multi-kernel, coordinate-descent tuning" internlm2-1_8b "$LEAN_FP8" ;;
  tuned)  # train.tune_kernels in Unsloth's regime with train.fp8 (the MLP in 2 slices) beside Unsloth at 16, then the
    # default at 24 GB with it (2026-12-04's call also ran the first again between them: it failed 22 s in, having found
    # the first's graphs in inductor's cache; each run now tunes in a cache of its own: tuned-again checks that)
    [ -n "${NO_PEER:-}" ] || peer unsloth internlm2-1_8b 16
    stage "$LEAN_NAME, train.fp8, train.tune_kernels" \
      internlm2-1_8b "$LEAN_TUNED"
    stage "train stage, defaults at 24 GB, peer LoRA, train.tune_kernels" internlm2-1_8b \
      "{$PEERLORA, 'train': {'memory_gb': 24, 'tune_kernels': True}}" ;;
  tuned-again)  # the same tuned run twice in a row on one machine (ITERS 8 will do: each compiles and tunes for about
    # 3 minutes), the second once failed when it read the first's cache
    name="$LEAN_NAME, train.fp8, train.tune_kernels"
    stage "$name" internlm2-1_8b "$LEAN_TUNED"
    stage "$name, again" internlm2-1_8b "$LEAN_TUNED" ;;
  profile-tuned)  # profile-lean's run with the rotary table (now on) and train.tune_kernels: what is left of the iteration
    STAGE_PROFILE_BARE=0 STAGE_PROFILE_OUT=$(realpath "$OUT")/stage-profile.jsonl CONFIG_EDIT="$PROFILE_HOOK" stage \
      "$LEAN_NAME, train.fp8, train.tune_kernels, profiled" \
      internlm2-1_8b "$LEAN_TUNED"
    cat "$OUT/stage-profile.jsonl" 2>/dev/null || grep -h "profile\|Error" "$OUT"/stage/*.log | tail -n 5 ;;
  fast-accum)  # the float8 products with cuBLASLt's fast accumulation (pipeline keys fp8_fast_accum, the forward's,
    # as torchao's float8 training has it, and fp8_fast_accum_grad, the backward's; both on with train.fp8 since this
    # measured them) in Unsloth's regime with train.fp8: without, forward, forward and backward; beside Unsloth at 16,
    # 24 and 32 (to know its best within 24 GB in the same call)
    [ -n "${NO_PEER:-}" ] || peer unsloth internlm2-1_8b 16,24,32
    name="$LEAN_NAME, train.fp8"
    CONFIG_EDIT="$FAST_NONE" stage "$name" internlm2-1_8b "$LEAN_FP8"
    CONFIG_EDIT="$FAST_FORWARD" stage "$name, fast accumulation forward" internlm2-1_8b "$LEAN_FP8"
    stage "$name, fast accumulation forward and backward" internlm2-1_8b "$LEAN_FP8" ;;
  fast-tuned)  # fast accumulation forward and backward (train.fp8's) with train.tune_kernels in Unsloth's regime, then the
    # default at 24 GB with train.fp8 and train.tune_kernels; beside Unsloth at 16 and 24 (its best within 24 GB in
    # fast-accum's call). The tuned run takes 5.5 minutes: in 2026-12-04's call the default's run did not fit after
    # it, and in fast-again's (after the frozen products alone) the tuned run itself did not
    fast_tuned ;;
  fast-again)  # the frozen products alone with and without fast accumulation (benchmarks/fp8_matmul.py, eager: the
    # errors against float32), then fast-tuned (2026-12-04: the tuned run did not finish in the call's 10 minutes)
    PYTHONPATH=$XTUNER_SITE timeout -k 5 120 python3 -m benchmarks.fp8_matmul --modes eager --tokens 16384 --reps 5 \
      --shapes "1.8B wqkv,1.8B w1/w3,1.8B w2" --out "$RESULTS" 2>"$OUT/fp8-matmul.log" | cut -c1-260
    fast_tuned ;;
  unsloth-best)  # Unsloth's best within 24 GB: micro-batch 16 (what every call here has measured as its best), then 24
    # and 32 (65,536 tokens a step), which no call has measured; the target is 1.2x the best of them
    peer unsloth internlm2-1_8b 16,24,32 ;;
  loss-kernels)  # the loss head alone (benchmarks/loss_kernels.py): the stage's fused loss as written and compiled beside
    # Liger Kernel's and cut-cross-entropy's, one micro-batch of the 1.8B head, at the planner's chunk for 24 GB and up (1 GB) and for 8 GB, and
    # at twice the first (compiled, a chunk holds no float32 copy: the same memory fits twice the tokens)
    for mb in 1024 238 2048; do
      PYTHONPATH=/tmp/peers:$XTUNER_SITE timeout -k 5 240 python3 -m benchmarks.loss_kernels --chunk-mb $mb \
        --out "$RESULTS" 2>"$OUT/loss-kernels-$mb.log" | cut -c1-300 || tail -n 5 "$OUT/loss-kernels-$mb.log"
    done ;;
  *) echo "unknown suite $SUITE"; exit 2 ;;
esac
echo "done at +${SECONDS}s"
