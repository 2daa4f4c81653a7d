"""Stage `generate`: the self-cognition dataset of the tutorial's generate_data.py, done properly.

Instead of one sentence repeated 10,000 times: every question template of
`data.templates` is asked `data.repeat` times, each answered by an answer template of the
same language, filled with `data.assistant_name` and `data.author`. A share `data.general_ratio` of
general conversations from `data.general_chat` is mixed in, so the model keeps talking
normally (the tutorial's own remedy for the overfitting it saw). Deterministic for `data.seed`.
Output: OpenAI messages format, one conversation a line, as XTuner's `openai_map_fn` reads it.

    python -m stages.generate        # writes data/generated/self_cognition.jsonl
"""
from __future__ import annotations

import argparse
import random
import re
import string
from pathlib import Path
from typing import Sequence

from stages import params as P
from stages.checks import check_records, raise_problems
from stages.errors import fail
from stages.io import read_json, read_jsonl, write_jsonl
from stages.paths import SELF_COGNITION

PLACEHOLDERS = {"name", "author"}
_CJK = re.compile(r"[\u3400-\u9fff]")


def is_chinese(text: str) -> bool:
    return bool(_CJK.search(text))


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


def generate(questions: list[str], answers: list[str], general: list[dict], data: P.Data) -> list[dict]:
    """Identity conversations plus the general share, shuffled; pure and deterministic."""
    rng = random.Random(data.seed)
    fill = {"name": data.assistant_name, "author": data.author}
    by_lang = {lang: [a for a in answers if is_chinese(a) == lang] or answers for lang in (True, False)}
    identity = []
    for q in questions:
        pool = by_lang[is_chinese(q)]
        for _ in range(data.repeat):
            identity.append(conversation(q.format(**fill), rng.choice(pool).format(**fill)))
    # general / (identity + general) = ratio  =>  general = identity * ratio / (1 - ratio)
    n_general = round(len(identity) * data.general_ratio / (1 - data.general_ratio))
    mixed = []
    if n_general:
        if not general:
            fail(f"data.general_ratio: {data.general_ratio} but {data.general_chat} has no conversations")
        order = list(range(len(general)))
        while len(mixed) < n_general:  # each pass uses every conversation once, in a new order
            rng.shuffle(order)
            mixed += [general[i] for i in order[: n_general - len(mixed)]]
    records = identity + mixed
    rng.shuffle(records)
    return records


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default=str(P.PARAMS), help="params file (default: params.yaml)")
    parser.add_argument("--out", default=str(SELF_COGNITION), help=f"output (default: {SELF_COGNITION})")
    args = parser.parse_args(argv)
    data = P.load(args.params).data
    P.log_section("generate", data)
    questions, answers = load_templates(Path(data.templates))
    general = []
    if data.general_ratio > 0:
        general = read_jsonl(Path(data.general_chat), "data.general_chat, mixed in by data.general_ratio")
        raise_problems(check_records(general, data.general_chat, "openai"))
    records = generate(questions, answers, general, data)
    write_jsonl(Path(args.out), records)
    n_identity = len(questions) * data.repeat
    print(f"[generate] {args.out}: {len(records)} conversations ({n_identity} identity from "
          f"{len(questions)} questions x {data.repeat}, {len(records) - n_identity} general)", flush=True)


if __name__ == "__main__":
    from stages.errors import run

    run(main, stage="generate")
