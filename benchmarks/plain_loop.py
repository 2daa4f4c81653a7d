"""The baseline: the QLoRA loop a user writes without the pipeline (transformers + peft +
bitsandbytes, gradient checkpointing, bf16 autocast, torch AdamW), at several micro-batches.

    python -m benchmarks.plain_loop MODEL_DIR --shape internlm2-1_8b --micro-batches 1 2 4 8 --out FILE
"""
from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.measure import SEQ, append, batch, free, gpu, measure
from benchmarks.shapes import SHAPES, mfu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--lora-r", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=quant, torch_dtype=torch.bfloat16,
                                                 device_map={"": 0})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=16, lora_dropout=0.1,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    shape, info = SHAPES[args.shape], gpu()
    for mb in args.micro_batches:
        data = batch(mb, shape["vocab_size"])

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(**data).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        result = measure(step, mb * SEQ, steps=args.steps)
        if "tokens_per_s" in result:
            result["mfu"] = round(mfu(result["tokens_per_s"], shape, args.lora_r, SEQ, info["name"]), 4)
        append(args.out, {"run": "plain QLoRA loop", "shape": args.shape, "micro_batch": mb,
                          "settings": "nf4, bf16 autocast, gradient checkpointing, torch AdamW", **result,
                          "gpu": info["name"]})
        del data
        free()
        if result.get("oom"):
            break


if __name__ == "__main__":
    main()
