"""Write a randomly initialised model of a real model's shape and structure, for runs on a GPU host
without the real weights (speed, memory and plumbing are the same; the answers are noise).

    python scripts/random_model.py internlm2-1_8b models/internlm2-1_8b-random --tokenizer models/assistant/llm
    python scripts/random_model.py 7b /tmp/models/7b --tokenizer models/assistant/llm --arch llama

Shapes: internlm2-1_8b (InternLM2-chat-1.8B's: hidden 2048, 24 layers, 16 heads, 8 KV heads,
intermediate 8192, vocab 92544; 1.89 B parameters) and 7b (internlm2-chat-7b's: hidden 4096, 32
layers, 32 heads, 8 KV heads, intermediate 14336, same vocabulary). `--arch internlm2` (the default)
writes the real structure: InternLM2ForCausalLM through remote code copied from the installed XTuner,
config.json with the real model's keys (stages/structures.py); `--arch llama` the same shape as a
transformers Llama model. The tokenizer is copied from --tokenizer; its ids must fit the vocabulary.
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
    parser.add_argument("--arch", choices=["internlm2", "llama"], default="internlm2",
                        help="internlm2: the real remote-code structure (default); llama: transformers' Llama")
    parser.add_argument("--plain-tokenizer", action="store_true",
                        help="write a plain fast tokenizer over the vocabulary instead (no remote code: for the "
                             "peer libraries of benchmarks/peers.py, which load tokenizers without trusting code)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import torch
    from transformers import AutoTokenizer

    from stages.structures import internlm2_config, llama_config, new_causal_lm

    start = time.time()
    tok = AutoTokenizer.from_pretrained(args.tokenizer, trust_remote_code=True)  # the tiny model's (remote code)
    s = SHAPES[args.shape]
    shape = dict(vocab_size=s["vocab_size"], hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
                 num_layers=s["num_hidden_layers"], num_heads=s["num_attention_heads"],
                 num_kv_heads=s["num_key_value_heads"], max_position_embeddings=s["max_position_embeddings"],
                 bos=tok.bos_token_id, eos=tok.eos_token_id, pad=tok.pad_token_id, torch_dtype=args.dtype)
    config = internlm2_config(**shape) if args.arch == "internlm2" else llama_config(**shape)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = new_causal_lm(args.out, config, args.seed, dtype=args.dtype, device=device)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(args.out, safe_serialization=True)
    if args.plain_tokenizer:
        plain_tokenizer(s["vocab_size"]).save_pretrained(args.out)
    else:
        tok.save_pretrained(args.out)
    for extra in ("generation_config.json",):
        if (args.tokenizer / extra).is_file():
            shutil.copy2(args.tokenizer / extra, args.out / extra)
    print(f"{args.out}: {args.shape}, {type(model).__name__}, {n / 1e9:.2f} B parameters, {args.dtype}, "
          f"{time.time() - start:.0f} s")


def plain_tokenizer(vocab_size: int):
    """A word-level fast tokenizer with one token per id: <unk>, <s>, </s>, <pad>, then t4 ... (the
    benchmarks feed token ids; the tokenizer only has to load)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {name: i for i, name in enumerate(["<unk>", "<s>", "</s>", "<pad>"])}
    vocab.update({f"t{i}": i for i in range(4, vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", model_max_length=32768)


if __name__ == "__main__":
    main()
