"""Stage stand_in, recipe internvl: its tiny stand-ins (params stand_in.tiny)."""
from __future__ import annotations

from pathlib import Path


def build(p, folder: Path) -> list[str]:
    """The recipe's stand-ins into `folder` (models/internvl/); one summary line each."""
    import tempfile

    from stages import base
    from stages.recipes.internvl import model

    with tempfile.TemporaryDirectory(dir=folder) as tmp:  # the LLM stand-in, inside the InternVL stand-in
        base.build(p.stand_in.llm, Path(tmp) / "llm")
        info = model.build(p.stand_in.internvl, Path(tmp) / "llm", folder / "model")
    return [f"model: InternVL stand-in, {info['parameters']:,} parameters ({info['vision_parameters']:,} in the "
            f"vision model), vocabulary {info['vocabulary']:,} (+<img>, </img>, <IMG_CONTEXT>), "
            f"{info['image_tokens_per_tile']} image tokens per tile"]
