"""Each speed and memory lever of the train stage, measured on its own, on the model the train
stage builds: XTuner's SupervisedFinetune with a 4-bit base and LoRA on every linear layer, bf16
autocast and torch AdamW (the train stage's optimizer wrapper without DeepSpeed).

    python -m benchmarks.levers MODEL_DIR --shape internlm2-1_8b --plan sweep --out FILE

A plan is a list of settings; the model is built once per (upcast_frozen) and the other levers
(micro-batch, activation checkpointing, fused loss, LoRA dropout, optimizer) are switched on the
built model between measurements.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.measure import SEQ, append, batch, free, gpu, measure
from benchmarks.shapes import SHAPES, mfu

BASE = {"micro_batch": 1, "checkpointing": True, "fused_loss": False, "dropout": 0.1, "optimizer": "adamw",
        "upcast_frozen": True, "loss_chunk_mb": 1024, "compile": False, "cudagraphs": False}
LEAN = {"upcast_frozen": False, "fused_loss": True}

PLANS = {
    # XTuner's defaults first, then one lever at a time, then together, for the 1.8B shape.
    "sweep": [
        {},
        {"micro_batch": 4}, {"micro_batch": 8},
        {"upcast_frozen": False},
        {"fused_loss": True}, {"fused_loss": True, "micro_batch": 8},
        {"dropout": 0.0},
        {"checkpointing": False, "micro_batch": 1},
        {"upcast_frozen": False, "fused_loss": True, "micro_batch": 8},
        {"upcast_frozen": False, "fused_loss": True, "micro_batch": 16},
        {"upcast_frozen": False, "fused_loss": True, "checkpointing": False, "micro_batch": 1},
        {"upcast_frozen": False, "fused_loss": True, "checkpointing": False, "micro_batch": 2},
        {"upcast_frozen": False, "fused_loss": True, "checkpointing": False, "micro_batch": 4},
        {"upcast_frozen": False, "fused_loss": True, "dropout": 0.0, "micro_batch": 8},
        {"upcast_frozen": False, "fused_loss": True, "dropout": 0.0, "checkpointing": False, "micro_batch": 2},
        {"upcast_frozen": False, "fused_loss": True, "dropout": 0.0, "checkpointing": False, "micro_batch": 4},
    ],
    # The winners again, then torch.compile of each decoder layer (kept on once on: it goes last).
    "compile": [
        {**LEAN, "micro_batch": 16},
        {**LEAN, "micro_batch": 2, "checkpointing": False},
        {**LEAN, "micro_batch": 16, "compile": True},
        {**LEAN, "micro_batch": 2, "checkpointing": False, "compile": True},
        {**LEAN, "micro_batch": 8, "compile": True},
    ],
    # The 7B shape under 8 GB: smaller loss chunks, 8-bit optimizer states, two sequences.
    "lean8": [
        {**LEAN, "optimizer": "paged_adamw8bit", "loss_chunk_mb": 256},
        {**LEAN, "optimizer": "paged_adamw8bit", "loss_chunk_mb": 256, "micro_batch": 2},
        {**LEAN, "optimizer": "paged_adamw8bit", "loss_chunk_mb": 256, "micro_batch": 2, "dropout": 0.0},
        {**LEAN, "optimizer": "paged_adamw8bit", "loss_chunk_mb": 256, "micro_batch": 3},
    ],
    # The 7B shape under 8 GB with compiled layers.
    "lean8c": [
        {**LEAN, "optimizer": "paged_adamw8bit", "loss_chunk_mb": 256, "micro_batch": 2, "compile": True},
        {**LEAN, "optimizer": "paged_adamw8bit", "loss_chunk_mb": 256, "micro_batch": 1, "compile": True},
        {**LEAN, "optimizer": "paged_adamw8bit", "loss_chunk_mb": 256, "micro_batch": 3, "compile": True},
    ],
    # Today's train stage on the 1.8B shape (the InternLM2 structure): dropout 0.1 as the preset and 0 as the
    # peers, then larger and smaller micro-batches; the last one is profiled with --profile.
    "stage": [
        {**LEAN, "micro_batch": 16, "compile": True},
        {**LEAN, "micro_batch": 8, "compile": True, "dropout": 0.0},
        {**LEAN, "micro_batch": 4, "compile": True, "dropout": 0.0, "checkpointing": False},
        {**LEAN, "micro_batch": 2, "compile": True, "dropout": 0.0, "checkpointing": False},
        {**LEAN, "micro_batch": 16, "compile": True, "dropout": 0.0},
    ],
    # The default at 24 GB with each compiled layer replayed as CUDA graphs (kernels.compile_layers, mode
    # "reduce-overhead"); its gradients checked after accumulation (`accumulation_error`).
    "cudagraphs": [{**LEAN, "micro_batch": 4, "compile": True, "dropout": 0.0, "checkpointing": False,
                    "cudagraphs": True}],
    # The stage's default at 24 GB alone (for `speed.sh profile`, beside the stage's own profile).
    "default": [{**LEAN, "micro_batch": 4, "compile": True, "dropout": 0.0, "checkpointing": False}],
    # The 7B shape: XTuner's default against the lean settings.
    "lean": [
        {},
        {"upcast_frozen": False, "fused_loss": True},
        {"upcast_frozen": False, "fused_loss": True, "optimizer": "adamw8bit"},
        {"upcast_frozen": False, "fused_loss": True, "optimizer": "paged_adamw8bit"},
        {"upcast_frozen": False, "fused_loss": True, "optimizer": "adamw8bit", "micro_batch": 2},
        {"upcast_frozen": False, "fused_loss": True, "dropout": 0.0, "optimizer": "adamw8bit"},
        {"upcast_frozen": False, "fused_loss": True, "checkpointing": False, "optimizer": "adamw8bit"},
    ],
}


def build(model_dir: Path, lora_r: int, upcast_frozen: bool):
    import torch
    from mmengine.config import ConfigDict
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from xtuner.model import SupervisedFinetune

    from stages import kernels

    kernels.apply({"fused_loss": True, "upcast_frozen": upcast_frozen, "compute_dtype": "bfloat16", "max_length": SEQ})
    llm = dict(type=AutoModelForCausalLM.from_pretrained, pretrained_model_name_or_path=str(model_dir),
               torch_dtype=torch.bfloat16, trust_remote_code=True,
               quantization_config=dict(type=BitsAndBytesConfig, load_in_4bit=True, load_in_8bit=False,
                                        llm_int8_threshold=6.0, llm_int8_has_fp16_weight=False,
                                        bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True,
                                        bnb_4bit_quant_type="nf4"))
    lora = dict(type=LoraConfig, r=lora_r, lora_alpha=16, lora_dropout=0.1, bias="none", task_type="CAUSAL_LM")
    model = SupervisedFinetune(llm=ConfigDict(llm), lora=ConfigDict(lora), use_activation_checkpointing=True).cuda()
    return model.train()


def switch(model, s: dict) -> None:
    import torch

    from stages import kernels

    base = model.llm.get_base_model()
    base._fused_loss = s["fused_loss"]
    kernels._SETTINGS["loss_chunk"] = s["loss_chunk_mb"] << 20
    if s["compile"] and not getattr(base, "_compiled", False):
        kernels.compile_layers(base, "reduce-overhead" if s["cudagraphs"] else None)
        base._compiled = True
    if s["checkpointing"]:
        model.gradient_checkpointing_enable()
    else:
        model.gradient_checkpointing_disable()
    for module in model.modules():
        if hasattr(module, "lora_dropout") and "default" in module.lora_dropout:
            module.lora_dropout["default"] = torch.nn.Dropout(s["dropout"]) if s["dropout"] else torch.nn.Identity()


def optimizer(params, name: str):
    import torch

    if name == "adamw":
        return torch.optim.AdamW(params, lr=2e-4)
    import bitsandbytes as bnb

    return {"adamw8bit": bnb.optim.AdamW8bit, "paged_adamw8bit": bnb.optim.PagedAdamW8bit}[name](params, lr=2e-4)


def accumulation_error(model, data) -> float:
    """Gradients accumulated over two backward passes of one batch against twice one pass's: the largest
    difference relative to the largest gradient (rounding: about 1e-2 in bf16; a lost pass: 0.5)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]

    def grads(passes: int) -> list:
        for p in params:
            p.grad = None
        for _ in range(passes):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                model.compute_loss(data)["loss"].backward()
        return [p.grad.float().clone() for p in params]

    one, two = grads(1), grads(2)
    scale = max(float(g.abs().max()) for g in one) * 2
    return round(max(float((b - 2 * a).abs().max()) for a, b in zip(one, two)) / scale, 5)


KINDS = [  # kernel name patterns, first match wins: where a step's GPU time goes
    ("4-bit dequantisation", ("dequantize", "kdequant")),
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("matmul", ("gemm", "cutlass", "sm90_", "sm100_", "matmul", "cublas", "nvjet", "xmma")),
    ("optimizer", ("adam", "multi_tensor")),
    ("compiled (Triton)", ("triton_",)),  # before copies: inductor's kernel names say `_to_copy`
    ("copies", ("memcpy", "memset", "copy_")),
    ("other element-wise", ("elementwise", "vectorized", "reduce", "softmax", "cat", "index")),
]


def profile(step, table_path: Path) -> dict:
    """Two profiled steps: GPU time by kind of kernel, the GPU idle share of the wall time, and the
    60 kernels with the most GPU time, as a table in `table_path`."""
    import time

    sync()
    with profiler() as prof:
        start = time.perf_counter()
        for _ in range(2):
            step()
        sync()
        wall = time.perf_counter() - start
    return summarize(prof, wall, 2, table_path)


def profiler():
    """torch's profiler over the host and, where there is one, the GPU."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    gpu = [ProfilerActivity.CUDA] if torch.cuda.is_available() else []
    return torch_profile(activities=[ProfilerActivity.CPU] + gpu)


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def summarize(prof, wall: float, steps: int, table_path: Path) -> dict:
    """A finished torch profile of `steps` steps that took `wall` seconds: the mean step, the GPU's busy
    time in it by kind of kernel (KINDS), its idle share, the host's self time in the profiled ops; the 60
    kernels with the most GPU time into `table_path`, the 60 ops with the most host time beside it."""
    import torch

    kinds: dict[str, float] = {}
    gpu_total = 0.0
    events = prof.key_averages()
    for event in events:
        us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        if not us or event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        gpu_total += us
        name = event.key.lower()
        kind = next((k for k, pats in KINDS if any(p in name for p in pats)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + us
    table_path.parent.mkdir(parents=True, exist_ok=True)
    sort = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    table_path.write_text(events.table(sort_by=sort, row_limit=60, max_name_column_width=90))
    # the host's side: the 60 ops with the most self CPU time (on every thread: autograd's backward runs on
    # its own), into `<table>.host.txt`
    table_path.with_suffix(".host.txt").write_text(events.table(sort_by="self_cpu_time_total", row_limit=60,
                                                                max_name_column_width=90))
    host_ms = sum(e.self_cpu_time_total for e in events) / steps / 1e3
    step_ms, busy_ms = wall / steps * 1e3, gpu_total / steps / 1e3
    return {"step_ms": round(step_ms, 1), "gpu_busy_ms": round(busy_ms, 1), "host_ops_ms": round(host_ms, 1),
            "gpu_idle_share": round(max(0.0, 1 - busy_ms / step_ms), 3),
            "gpu_ms_by_kind": {k: round(v / steps / 1e3, 1) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--plan", choices=sorted(PLANS), required=True)
    parser.add_argument("--lora-r", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--profile", type=Path, default=None,
                        help="after the plan, profile two steps of its last setting: a kernel table to this file")
    args = parser.parse_args()
    import torch

    from stages.xtuner_api import patch_stack

    patch_stack()
    shape, info = SHAPES[args.shape], gpu()
    settings = [{**BASE, **s} for s in PLANS[args.plan]]
    model, built_with = None, None
    for s in sorted(settings, key=lambda s: not s["upcast_frozen"]):  # one build per upcast setting
        if built_with != s["upcast_frozen"]:
            del model
            free()
            model, built_with = build(args.model, args.lora_r, s["upcast_frozen"]), s["upcast_frozen"]
        switch(model, s)
        opt = optimizer([p for p in model.parameters() if p.requires_grad], s["optimizer"])
        data = batch(s["micro_batch"], shape["vocab_size"])

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model.compute_loss(data)["loss"]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=not s["cudagraphs"])

        result = measure(step, s["micro_batch"] * SEQ, steps=args.steps)
        if s["cudagraphs"] and "tokens_per_s" in result:
            result["accumulation_error"] = accumulation_error(model, data)
        if "tokens_per_s" in result:
            result["mfu"] = round(mfu(result["tokens_per_s"], shape, args.lora_r, SEQ, info["name"]), 4)
        append(args.out, {"run": "train stage lever", "shape": args.shape, **s, **result, "gpu": info["name"]})
        if args.profile and s is settings[-1] and "tokens_per_s" in result:
            try:
                append(args.out, {"run": "profile", "shape": args.shape, **s, **profile(step, args.profile)})
            except Exception as err:  # a profiler's failure must not lose the measurements
                append(args.out, {"run": "profile", "error": repr(err)[:500]})
        del opt, data
        free()


if __name__ == "__main__":
    main()
