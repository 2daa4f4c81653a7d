"""Stage validate, recipe assistant: the generated self-cognition conversations (OpenAI messages)."""
from __future__ import annotations

from stages import params as P
from stages.dataset import validate_dataset
from stages.io import read_jsonl
from stages.paths import SELF_COGNITION, llm_dir


def run(p: P.Params, template: dict) -> tuple[list, dict]:
    records = read_jsonl(SELF_COGNITION, "run `dvc repro prepare` first")
    return validate_dataset(records, str(SELF_COGNITION), "openai", llm_dir(p.recipe), template, p.data)
