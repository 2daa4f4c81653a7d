"""The LLM stand-in (built by the stage stand_in into models/<recipe>/llm), deterministically.

A causal LM of the structure (InternLM2 remote code, or Llama) and shape in `stand_in.tiny.llm`, initialised from a
fixed seed and pretrained for `pretrain_steps` on the general conversations of data/raw/assistant/ (so it is a tiny
chat model, not noise: a fine-tune then has something to change and something to forget), and a
SentencePiece tokenizer laid out as InternLM2's (`tokenizer.model` behind `tokenization_internlm2.py`
and `auto_map`; stages/remote_code/internlm2/), trained on the project's own text (data/raw/assistant/) with
the special tokens of the InternLM2 chat template. Same params, same bytes: DVC caches it like any output.
Both load back with `AutoTokenizer` / `AutoModelForCausalLM.from_pretrained`.

    dvc repro stand_in@tiny          # writes models/<recipe>/ (the LLM, and the recipe's other stand-ins)
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Iterator

from stages import params as P
from stages.errors import fail
from stages.paths import INTERNLM2_TOKENIZER_CODE, RAW_ASSISTANT

# Token ids as in InternLM2's tokenizer: <unk>=0, <s>=1, </s>=2, then the chat template's tokens.
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|action_start|>",
                  "<|action_end|>", "<|interpreter|>", "<|plugin|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# the text recipe's files, which the tokenizer is trained on: the image recipes' captions are left out,
# so that their edits never rebuild the base model (they encode with byte fallback where no piece fits)
CORPUS_FILES = ("self_cognition.json", "general_chat.jsonl", "general_heldout.jsonl", "eval_prompts.json")


def read_records(path: Path) -> list:
    """A JSON file's document, or a JSON Lines file's records (errors: one line naming file and line)."""
    from stages.io import read_json, read_jsonl

    what = "the tiny model's tokenizer and pretraining text"
    return read_jsonl(path, what) if path.suffix == ".jsonl" else [read_json(path, what)]


def corpus(raw: Path = RAW_ASSISTANT) -> Iterator[str]:
    """Every piece of text of the text recipe's files, for training the tokenizer (placeholders removed)."""
    for name in CORPUS_FILES:
        path = raw / name
        if not path.is_file():
            fail(f"{path}: missing (the tiny model's tokenizer is trained on {', '.join(CORPUS_FILES)})")
        for doc in read_records(path):
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


def build_tokenizer(texts: list[str], vocab_size: int, folder: Path):
    """InternLM2's tokenizer layout in `folder`: a SentencePiece BPE model (`tokenizer.model`, byte
    fallback, the chat tokens as pieces) trained on `texts`, loaded through `tokenization_internlm2.py`
    and `auto_map` as internlm2-chat's is; the loaded tokenizer."""
    import io

    import sentencepiece as spm

    from transformers import AutoTokenizer

    from stages.io import write_json

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, user_defined_symbols=SPECIAL_TOKENS[3:], unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            character_coverage=0.98, split_digits=True, add_dummy_prefix=False, remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True, normalization_rule_name="identity", max_sentence_length=1 << 16,
            num_threads=1, minloglevel=2)
    except RuntimeError as err:  # too small a vocabulary for the text's characters, and the like
        reason = str(err).strip().splitlines()[-1].rsplit("] ", 1)[-1]  # without SentencePiece's source location
        fail(f"stand_in.tiny.llm.vocab_size: {vocab_size}: SentencePiece cannot train on the project's text ({reason})")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    shutil.copy2(INTERNLM2_TOKENIZER_CODE, folder / INTERNLM2_TOKENIZER_CODE.name)
    write_json(folder / "tokenizer_config.json", {
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
        "tokenizer_class": "InternLM2Tokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": "</s>", "additional_special_tokens": SPECIAL_TOKENS[3:], "add_bos_token": True,
        "add_eos_token": False, "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
        "padding_side": "right", "model_max_length": 1 << 20})
    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True, local_files_only=True)


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


def chat_corpus(raw: Path = RAW_ASSISTANT) -> list[list[dict]]:
    """The general conversations the base model is pretrained on (never the identity data)."""
    path = raw / "general_chat.jsonl"
    chats = []
    for number, record in enumerate(read_records(path), 1):
        if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
            fail(f"{path}: record {number}: no `messages` list")
        chats.append(record["messages"])
    return chats


def pretrain(model, tokenizer, chats: list[list[dict]], steps: int, seed: int, seq: int = 128,
             batch: int = 8, lr: float = 3e-3) -> list[float]:
    """A short full-parameter pretraining on chat-formatted text, so the base model is a (tiny) language
    model that chats, not noise. A fixed seed: the same bytes on every run (on one thread and on two: the
    192-wide default's pretraining gave the same bytes on both, in 65 s and 44 s on a 2-core AMD EPYC). The
    threads as the stages': one up to modeldir.TINY_HIDDEN wide, else torch's (OMP_NUM_THREADS wins)."""
    import random

    import torch

    from stages.modeldir import cpu_threads, use_threads

    if steps == 0:
        return []
    threads = torch.get_num_threads()
    use_threads(cpu_threads("cpu", model.config.hidden_size))
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


def build(tiny: P.TinyModel, out: Path, raw: Path = RAW_ASSISTANT) -> None:
    from stages.io import output_dir

    texts = list(corpus(raw))
    with output_dir(out) as tmp:
        tokenizer = build_tokenizer(texts, tiny.vocab_size, tmp)
        model = build_model(tiny, tokenizer, tmp)
        losses = pretrain(model, tokenizer, chat_corpus(raw), tiny.pretrain_steps, tiny.seed)
        if losses:
            print(f"[stand_in] pretrained {len(losses)} steps on {raw / 'general_chat.jsonl'}: loss "
                  f"{losses[0]:.2f} -> {sum(losses[-10:]) / len(losses[-10:]):.2f}", flush=True)
        n_params = sum(p.numel() for p in model.parameters())
        tokenizer.save_pretrained(tmp)
        model.save_pretrained(tmp, safe_serialization=True)
        finish_config(tmp)
    print(f"[stand_in] {out}: {type(model).__name__}, {n_params:,} parameters, vocabulary {len(tokenizer):,} "
          f"(trained on {len(texts):,} texts from {raw}/)", flush=True)
