"""Stage select, recipe internvl: the last checkpoint (its answers are not scored; stages/checkpoints.py)."""
from __future__ import annotations

from stages.checkpoints import image_recipe_run


def run(p, pipeline: dict) -> tuple[dict, list[dict], list[dict], str]:
    return image_recipe_run(p, "internvl")
