"""What the select stage's scoring of one checkpoint costs, with the adapter as a LoRA branch beside the base
weights (peft's forward) against merged into them (stages/recipes/assistant/select.py `MergedWeights`), on
one model directory: the evaluate prompts' shape (31 prompts, greedy, up to 48 new tokens) and perplexity of
20 conversations, after a warm-up of each. The adapter is random (LoRA B non-zero), so both paths do the
same arithmetic as a trained one. One JSON line to stdout and to --out.

    python -m benchmarks.select_decode MODEL_DIR [--rank 64] [--prompts 31] [--new-tokens 48] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=31)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--conversations", type=int, default=20)
    ap.add_argument("--out")
    args = ap.parse_args()
    from benchmarks.measure import append
    from stages.xtuner_api import patch_stack

    patch_stack()
    import torch
    from peft import LoraConfig, get_peft_model

    from stages.generation import TransformersChat
    from stages.recipes.assistant.select import MergedWeights
    from stages.structures import lora_targets

    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.time()
    chat = TransformersChat(Path(args.model), device, "")
    config = json.loads((Path(args.model) / "config.json").read_text())
    targets = lora_targets(config, "all-linear")
    chat.model = get_peft_model(chat.model, LoraConfig(r=args.rank, lora_alpha=16, lora_dropout=0.0, bias="none",
                                                       target_modules=list(targets), task_type="CAUSAL_LM")).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in chat.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    merged = MergedWeights(chat.model)
    rec = {"model": args.model, "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
           "rank": args.rank, "prompts": args.prompts, "new_tokens": args.new_tokens, "load_s": round(time.time() - t0, 2)}
    prompts = [f"question {i}: who are you, and what is {i} + {i}?" for i in range(args.prompts)]
    chats = [[{"role": "user", "content": f"tell me about {i}"}, {"role": "assistant", "content": "word " * 200}]
             for i in range(args.conversations)]
    for mode in ("lora_branch", "merged"):
        t = time.time()
        if mode == "merged":
            merged.set(True)
        swap = time.time() - t
        ctx = chat.model.disable_adapter() if mode == "merged" else torch.no_grad()
        with ctx:
            chat.generate(prompts[:2], 4, 0, warm_up=False)  # warm-up
            answers, n, seconds = chat.generate(prompts, args.new_tokens, 0, warm_up=False)
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.time()
            ppl = chat.perplexity(chats)
            rec[mode] = {"generate_s": round(seconds, 3), "tokens": n, "ms_per_step": round(1000 * seconds / args.new_tokens, 1),
                         "perplexity_s": round(time.time() - t, 3), "perplexity": ppl, "merge_s": round(swap, 3),
                         "answers_head": answers[0][:60]}
        print(json.dumps({mode: rec[mode]}), flush=True)
    append(Path(args.out) if args.out else None, rec)


if __name__ == "__main__":
    main()
