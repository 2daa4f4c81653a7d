"""Stage stand_in, recipe assistant: its tiny stand-ins (params stand_in.tiny)."""
from __future__ import annotations

from pathlib import Path


def build(p, folder: Path) -> list[str]:
    """The recipe's stand-ins into `folder` (models/assistant/); one summary line each."""
    from stages import base

    base.build(p.stand_in.llm, folder / "llm")
    return ["llm: the LLM stand-in"]
