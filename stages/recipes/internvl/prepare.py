"""Stage prepare, recipe internvl."""
from __future__ import annotations

from stages.paths import INTERNVL_REPEATED as PREPARED


def prepare(p) -> str:
    """Its training data from data/raw/internvl/ into data/generated/internvl/; a summary line."""
    from stages.repeat import write

    return write(p.data.internvl, "data.internvl", PREPARED)
