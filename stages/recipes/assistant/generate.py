"""The assistant recipe's data preparation (stage `prepare`): the self-cognition dataset of the tutorial's generate_data.py, done properly.

Instead of one sentence repeated 10,000 times: every question template of
`data.assistant.templates` is asked `data.assistant.repeat` times, each answered by an answer template of the
same language, filled with `data.assistant.name` and `data.assistant.author`. Half of those times the question
comes in its other written form, with or without its final mark ("你是谁" and "你是谁？"), as people type it:
with one form only, the model learns the mark as the cue (the tiny default answered "你是谁" with its identity
and "你是谁？" with noise). A share `data.assistant.general_ratio` of
general conversations from `data.assistant.general_chat` is mixed in, so the model keeps talking
normally (the tutorial's own remedy for the overfitting it saw). Deterministic for `data.assistant.seed`.
Output: OpenAI messages format, one conversation a line, as XTuner's `openai_map_fn` reads it.

    python -m stages.prepare         # with recipe: assistant, writes data/generated/assistant/self_cognition.jsonl
"""
from __future__ import annotations

import random
import re
import string
from pathlib import Path

from stages import params as P
from stages.checks import check_records, raise_problems
from stages.errors import fail
from stages.io import read_json, read_jsonl, write_jsonl

PLACEHOLDERS = {"name", "author"}
_CJK = re.compile(r"[\u3400-\u9fff]")
_MARKS = "？?。.！!"
_ASKS_ZH = re.compile("谁|什么|吗|呢|哪|怎|几|多少")
_ASKS_EN = {"who", "what", "which", "whose", "are", "is", "do", "does", "did", "can", "could", "how", "where",
            "why", "will", "would", "should"}


def is_chinese(text: str) -> bool:
    return bool(_CJK.search(text))


def other_form(question: str) -> str:
    """`question` as it is also typed: without its final mark, or with the mark it lacks (full-width in
    Chinese; a question mark where it asks, else a full stop)."""
    text = question.rstrip()
    if text and text[-1] in _MARKS:
        return text.rstrip(_MARKS).rstrip()
    if is_chinese(text):
        return text + ("？" if _ASKS_ZH.search(text) else "。")
    words = text.split()
    return text + ("?" if words and words[0].lower() in _ASKS_EN else ".")


def load_templates(path: Path) -> tuple[list[str], list[str]]:
    """The question and answer templates; every mistake names the file, list and index."""
    data = read_json(path, "the self-cognition templates")
    if not isinstance(data, dict) or set(data) != {"questions", "answers"}:
        fail(f"{path}: expected an object with exactly the keys 'questions' and 'answers'")
    for key in ("questions", "answers"):
        items = data[key]
        if not isinstance(items, list) or not items:
            fail(f"{path}: {key}: expected a non-empty list of strings")
        for i, text in enumerate(items):
            if not isinstance(text, str) or not text.strip():
                fail(f"{path}: {key}[{i}]: expected a non-empty string")
            try:
                fields = {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
            except ValueError as err:
                fail(f"{path}: {key}[{i}]: {err} (write a literal brace as {{{{ or }}}})")
            if fields - PLACEHOLDERS:
                fail(f"{path}: {key}[{i}]: unknown placeholder {{{sorted(fields - PLACEHOLDERS)[0]}}} "
                     "(allowed: {name}, {author})")
    return data["questions"], data["answers"]


def conversation(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def generate(questions: list[str], answers: list[str], general: list[dict], data: P.AssistantData) -> list[dict]:
    """Identity conversations plus the general share, shuffled; pure and deterministic."""
    rng = random.Random(data.seed)
    fill = {"name": data.name, "author": data.author}
    by_lang = {lang: [a for a in answers if is_chinese(a) == lang] or answers for lang in (True, False)}
    identity = []
    for q in questions:
        pool = by_lang[is_chinese(q)]
        asked = q.format(**fill)
        forms = (asked, other_form(asked))
        for i in range(data.repeat):  # the two written forms in turn
            identity.append(conversation(forms[i % 2], rng.choice(pool).format(**fill)))
    # general / (identity + general) = ratio  =>  general = identity * ratio / (1 - ratio)
    n_general = round(len(identity) * data.general_ratio / (1 - data.general_ratio))
    mixed = []
    if n_general:
        if not general:
            fail(f"data.assistant.general_ratio: {data.general_ratio} but {data.general_chat} has no conversations")
        order = list(range(len(general)))
        while len(mixed) < n_general:  # each pass uses every conversation once, in a new order
            rng.shuffle(order)
            mixed += [general[i] for i in order[: n_general - len(mixed)]]
    records = identity + mixed
    rng.shuffle(records)
    return records


def write(data: P.AssistantData, out: Path) -> str:
    """Stage prepare for the assistant: the conversations generated from `data`, written to `out`."""
    P.log_section("prepare", data)
    questions, answers = load_templates(Path(data.templates))
    general = []
    if data.general_ratio > 0:
        general = read_jsonl(Path(data.general_chat), "data.assistant.general_chat, mixed in by data.assistant.general_ratio")
        raise_problems(check_records(general, data.general_chat, "openai"))
    records = generate(questions, answers, general, data)
    write_jsonl(out, records)
    n_identity = len(questions) * data.repeat
    return (f"{out}: {len(records)} conversations ({n_identity} identity from {len(questions)} questions x "
            f"{data.repeat}, {len(records) - n_identity} general)")
