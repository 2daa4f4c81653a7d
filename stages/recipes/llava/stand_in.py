"""Stage stand_in, recipe llava: its tiny stand-ins (params stand_in.tiny)."""
from __future__ import annotations

from pathlib import Path


def build(p, folder: Path) -> list[str]:
    """The recipe's stand-ins into `folder` (models/llava/); one summary line each."""
    from stages import base
    from stages.recipes.llava import vision

    base.build(p.stand_in.llm, folder / "llm")
    info = vision.build(p.stand_in.llava, folder / "vision")
    return ["llm: the LLM stand-in", f"vision: CLIP vision encoder, {info['parameters']:,} parameters, {info['image_size']} px / patch "
            f"{info['patch_size']} = {info['image_tokens']} image tokens"]
