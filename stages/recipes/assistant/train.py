"""Stage train, recipe assistant: XTuner's trainer on the packed conversations; nothing before it."""
from __future__ import annotations

from stages.paths import VALIDATED_ASSISTANT, llm_dir


def setup(pipeline: dict) -> None:
    """Nothing to patch: the text recipe's model class is what stages/kernels.py serves."""


def before(p) -> dict:
    return {"data": VALIDATED_ASSISTANT, "model": llm_dir(p.recipe)}


def tokens_per_iter(pipeline: dict) -> float | None:
    return None  # XTuner's throughput hook counts the packed tokens
