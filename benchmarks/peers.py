"""What a user would run instead of the train stage, on the same shapes: Unsloth, transformers + peft
with Liger Kernel, and plain transformers + peft. One library per process (Unsloth patches
transformers when imported), on the GPU host's own transformers (5.x), not XTuner's pinned 4.48.

    python -m benchmarks.peers --lib unsloth|liger|hf --model DIR --mbs 8,16 --out FILE

Every library gets the same work: a 4-bit NF4 base with double quantization and bf16 compute, LoRA
r 64, alpha 16 on every linear layer of the blocks (dropout as `--dropout`, 0 by default: Unsloth's
fast path needs it), activation checkpointing (Unsloth's own offloaded kind for Unsloth, torch's
non-reentrant for the others, as TRL's SFTTrainer sets it), SDPA attention, sequences of 2048 random
token ids with every position a label, bf16 autocast, torch's fused AdamW, one optimizer step per
micro-batch. Each library loads and wraps the model its own documented way:

- unsloth: `FastLanguageModel.from_pretrained(load_in_4bit=True)` and `get_peft_model(...,
  use_gradient_checkpointing="unsloth")`; its adapters stay float32.
- liger: `apply_liger_kernel_to_llama(rope, rms_norm, swiglu, fused_linear_cross_entropy)` before
  the model is built, then as hf.
- hf: `from_pretrained(quantization_config=BitsAndBytesConfig(...))`, gradient checkpointing,
  `get_peft_model`; adapters cast to bf16, as TRL does for a QLoRA model.

The peers need a transformers architecture: the model given is the InternLM2 shape as a Llama model
(`scripts/random_model.py SHAPE DIR --arch llama`); the train stage runs the InternLM2 structure.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import time
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "triton", "accelerate", "unsloth", "unsloth_zoo",
             "liger-kernel")


def versions() -> dict:
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def load_unsloth(model_dir: Path, seq: int, r: int, alpha: int, dropout: float):
    import unsloth  # noqa: F401  (first: it patches transformers and peft on import)
    import torch
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(model_name=str(model_dir), max_seq_length=seq,
                                                 dtype=torch.bfloat16, load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=r, lora_alpha=alpha, lora_dropout=dropout,
                                             target_modules=TARGETS, bias="none", random_state=0,
                                             use_gradient_checkpointing="unsloth", max_seq_length=seq)
    FastLanguageModel.for_training(model)
    return model, "unsloth (offloaded)"


def load_hf(model_dir: Path, r: int, alpha: int, dropout: float, liger: bool):
    import torch
    if liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), quantization_config=quant, dtype=torch.bfloat16,
                                                 attn_implementation="sdpa", device_map={"": 0})
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=TARGETS,
                                             bias="none", task_type="CAUSAL_LM"))
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.to(torch.bfloat16)
    return model.train(), "torch non-reentrant"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lib", choices=["unsloth", "liger", "hf"], required=True)
    parser.add_argument("--model", type=Path, required=True, help="a Llama-architecture model folder")
    parser.add_argument("--shape", default="internlm2-1_8b", help="the shape's name, for MFU and the table")
    parser.add_argument("--mbs", default="8,16", help="micro-batches to measure, in order, until one runs out of memory")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--r", type=int, default=64)
    parser.add_argument("--alpha", type=int, default=16)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", type=Path, required=True, help="JSON lines file, appended to")
    args = parser.parse_args()
    from benchmarks.measure import append, free, gpu, measure
    from benchmarks.shapes import SHAPES, mfu

    start = time.time()
    if args.lib == "unsloth":
        model, checkpointing = load_unsloth(args.model, args.seq, args.r, args.alpha, args.dropout)
    else:
        model, checkpointing = load_hf(args.model, args.r, args.alpha, args.dropout, liger=args.lib == "liger")
    import torch

    load_s = round(time.time() - start, 1)
    info = gpu()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=2e-4, weight_decay=0.0, fused=True)
    vocab = model.config.vocab_size
    common = {"run": "peer", "lib": args.lib, "shape": args.shape, "seq": args.seq, "lora_r": args.r,
              "lora_alpha": args.alpha, "dropout": args.dropout, "checkpointing": checkpointing, "load_s": load_s,
              "trainable": sum(p.numel() for p in trainable),
              "adapter_dtype": str(trainable[0].dtype).replace("torch.", ""), "versions": versions(), "gpu": info["name"]}
    generator = torch.Generator(device="cuda").manual_seed(0)
    for micro in [int(m) for m in args.mbs.split(",") if m]:
        losses = []

        def step():
            ids = torch.randint(4, vocab, (micro, args.seq), device="cuda", generator=generator)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())

        result = measure(step, micro * args.seq, warmup=args.warmup, steps=args.steps)
        if "tokens_per_s" in result:
            result["mfu"] = round(mfu(result["tokens_per_s"], SHAPES[args.shape], args.r, args.seq, info["name"]) or 0, 4)
            result["losses"] = [round(float(x), 4) for x in losses]
        append(args.out, {**common, "micro_batch": micro, **result})
        if result.get("oom"):
            break
        free()


if __name__ == "__main__":
    main()
