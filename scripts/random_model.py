"""Write a randomly initialised model of a real model's shape, for runs on a GPU host without the
real weights (speed, memory and plumbing are the same; the answers are noise).

    python scripts/random_model.py internlm2-1_8b models/internlm2-1_8b-random --tokenizer models/tiny-internlm2

Shapes: internlm2-1_8b (InternLM2-chat-1.8B's: Llama architecture, hidden 2048, 24 layers, 16 heads,
8 KV heads, intermediate 8192, vocab 92544; 1.89 B parameters) and 7b (hidden 4096, 32 layers,
32 heads, 8 KV heads, intermediate 14336, same vocabulary). The tokenizer is copied from
--tokenizer; its ids must fit the vocabulary.
"""
import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.shapes import SHAPES  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("out", type=Path)
    parser.add_argument("--tokenizer", type=Path, required=True, help="folder whose tokenizer files are copied")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    start = time.time()
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    config = LlamaConfig(**SHAPES[args.shape], rms_norm_eps=1e-5, tie_word_embeddings=False, rope_theta=1e6,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, torch_dtype=args.dtype)
    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(getattr(torch, args.dtype))
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(args.out, safe_serialization=True)
    tok.save_pretrained(args.out)
    for extra in ("generation_config.json",):
        if (args.tokenizer / extra).is_file():
            shutil.copy2(args.tokenizer / extra, args.out / extra)
    print(f"{args.out}: {args.shape}, {n / 1e9:.2f} B parameters, {args.dtype}, {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
