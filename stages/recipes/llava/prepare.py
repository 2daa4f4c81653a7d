"""Stage prepare, recipe llava."""
from __future__ import annotations

from stages.paths import LLAVA_REPEATED as PREPARED


def prepare(p) -> str:
    """Its training data from data/raw/llava/ into data/generated/llava/; a summary line."""
    from stages.repeat import write

    return write(p.data.llava, "data.llava", PREPARED)
