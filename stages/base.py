"""Stage `base`: build the embedded default's base model, deterministically.

A Llama-architecture causal LM of the shape in `model.tiny`, initialised from a fixed seed and
pretrained for `model.tiny.pretrain_steps` on the general conversations of data/raw/ (so it is a tiny
chat model, not noise: a fine-tune then has something to change and something to forget), and a
byte-level BPE tokenizer trained on the project's own text (`data/raw/`) with the special
tokens of the InternLM2 chat template. Same params, same bytes: DVC caches it like any output.
Both load back with `AutoTokenizer` / `AutoModelForCausalLM.from_pretrained`.

    python -m stages.base            # writes models/tiny-internlm2
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Iterator, Sequence

from stages import params as P
from stages.paths import RAW, TINY_MODEL

# Token ids as in InternLM2's tokenizer: <unk>=0, <s>=1, </s>=2, then the chat template's tokens.
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|action_start|>",
                  "<|action_end|>", "<|interpreter|>", "<|plugin|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def corpus(raw: Path = RAW) -> Iterator[str]:
    """Every piece of text the project ships, for training the tokenizer (placeholders removed)."""
    for path in sorted(raw.rglob("*")):
        if path.suffix not in (".json", ".jsonl") or not path.is_file():
            continue
        if path.relative_to(raw).parts[0] == "internvl":  # the internvl recipe's captions came later: left
            continue  # out, the tiny model stayed byte-identical (they encode as bytes where no merge fits)
        text = path.read_text(encoding="utf-8")
        docs = [json.loads(line) for line in text.splitlines() if line.strip()] \
            if path.suffix == ".jsonl" else [json.loads(text)]
        for doc in docs:
            yield from (re.sub(r"\{(name|author)\}", "", s) for s in _strings(doc))


def _strings(obj: object) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _strings(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _strings(value)


def build_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(  # InternLM2 adds <s> in front
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>",
        additional_special_tokens=SPECIAL_TOKENS[3:], chat_template=CHAT_TEMPLATE,
        model_input_names=["input_ids", "attention_mask"], padding_side="right",
        clean_up_tokenization_spaces=False)


def build_model(tiny: P.TinyModel, tokenizer, folder: Path):
    """A randomly initialised causal LM of the architecture and shape in `tiny`, from its fixed seed;
    `folder` receives its config.json (and remote code), as a downloaded model directory has them."""
    from transformers import GenerationConfig

    from stages.structures import internlm2_config, llama_config, new_causal_lm

    shape = dict(vocab_size=len(tokenizer), hidden_size=tiny.hidden_size, intermediate_size=tiny.intermediate_size,
                 num_layers=tiny.num_layers, num_heads=tiny.num_heads, num_kv_heads=tiny.num_kv_heads,
                 max_position_embeddings=tiny.max_position_embeddings, bos=tokenizer.bos_token_id,
                 eos=tokenizer.eos_token_id, pad=tokenizer.pad_token_id)
    config = internlm2_config(**shape) if tiny.architecture == "internlm2" else llama_config(**shape)
    model = new_causal_lm(folder, config, tiny.seed)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=[tokenizer.eos_token_id, im_end],
        pad_token_id=tokenizer.pad_token_id)
    return model


def finish_config(folder: Path) -> None:
    """config.json as a downloaded model has it: no `_name_or_path` of the temporary folder."""
    from stages.io import write_json

    path = folder / "config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg.pop("_name_or_path", None)
    write_json(path, cfg)


def chat_corpus(raw: Path = RAW) -> list[list[dict]]:
    """The general conversations the base model is pretrained on (never the identity data)."""
    path = raw / "general_chat.jsonl"
    return [json.loads(line)["messages"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def pretrain(model, tokenizer, chats: list[list[dict]], steps: int, seed: int, seq: int = 128,
             batch: int = 8, lr: float = 3e-3) -> list[float]:
    """A short full-parameter pretraining on chat-formatted text, so the base model is a (tiny) language
    model that chats, not noise. One thread and a fixed seed: the same bytes on every run."""
    import random

    import torch

    if steps == 0:
        return []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    ids = [t for chat in chats for t in tokenizer.apply_chat_template(chat) + [tokenizer.eos_token_id]]
    blocks = [ids[i:i + seq] for i in range(0, len(ids) - seq, seq)]
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * (1 - s / steps))
    model.train()
    losses = []
    try:
        for _ in range(steps):
            x = torch.tensor(rng.sample(blocks, min(batch, len(blocks))))
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return losses


def build(tiny: P.TinyModel, out: Path, raw: Path = RAW) -> None:
    from stages.io import output_dir

    texts = list(corpus(raw))
    tokenizer = build_tokenizer(texts, tiny.vocab_size)
    with output_dir(out) as tmp:
        model = build_model(tiny, tokenizer, tmp)
        losses = pretrain(model, tokenizer, chat_corpus(raw), tiny.pretrain_steps, tiny.seed)
        if losses:
            print(f"[base] pretrained {len(losses)} steps on {raw / 'general_chat.jsonl'}: loss "
                  f"{losses[0]:.2f} -> {sum(losses[-10:]) / len(losses[-10:]):.2f}", flush=True)
        n_params = sum(p.numel() for p in model.parameters())
        tokenizer.save_pretrained(tmp)
        model.save_pretrained(tmp, safe_serialization=True)
        finish_config(tmp)
    print(f"[base] {out}: {type(model).__name__}, {n_params:,} parameters, vocabulary {len(tokenizer):,} "
          f"(trained on {len(texts):,} texts from {raw}/)", flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.base", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default=str(P.PARAMS), help="params file (default: params.yaml)")
    parser.add_argument("--out", default=str(TINY_MODEL), help=f"output folder (default: {TINY_MODEL})")
    args = parser.parse_args(argv)
    params = P.load(args.params)
    P.log_section("base", params.model.tiny)
    build(params.model.tiny, Path(args.out))


if __name__ == "__main__":
    from stages.errors import run

    run(main, stage="base")
