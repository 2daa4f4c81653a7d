"""Stage prepare, recipe assistant."""
from __future__ import annotations

from stages.paths import SELF_COGNITION as PREPARED


def prepare(p) -> str:
    """Its training data from data/raw/assistant/ into data/generated/assistant/; a summary line."""
    from stages.recipes.assistant.generate import write

    return write(p.data.assistant, PREPARED)
