"""The recipes, one package each, behind the interface of `interface.py`.

    assistant   the self-cognition text QLoRA (the InternLM2-chat-1.8B "personal assistant" tutorial)
    llava       XTuner's LLaVA QLoRA: an InternLM2 LLM, a CLIP vision encoder, a projector
    internvl    XTuner's InternVL2-2B QLoRA (the CLoT-style witty-caption tutorial)

A stage resolves the selected recipe with `get(params.recipe)` (its constants: interface.py) and its
own step with `step(params.recipe, "<step>")`, which imports that one module of that one package: a
stage's code is the shared modules and the selected recipe's (dvc.yaml lists `stages/recipes/${recipe}`;
tests/test_deps.py follows `step` calls by their literal step name).
"""
from __future__ import annotations

import importlib

from stages.recipes.interface import Recipe

NAMES = ("assistant", "llava", "internvl")


def get(name: str) -> Recipe:
    """The recipe package `name` (one of NAMES), imported now."""
    if name not in NAMES:
        from stages.errors import fail

        fail(f"recipe: {name!r} is not a recipe ({', '.join(NAMES)})")
    return importlib.import_module(f"stages.recipes.{name}")  # type: ignore[return-value]


# the modules every recipe package has, one a stage (interface.py)
STEPS = ("stand_in", "prepare", "validate", "config", "train", "select", "convert", "merge", "evaluate", "report")


def step(name: str, part: str):
    """The module `part` (one of STEPS) of recipe `name`, imported now."""
    get(name)  # a bad recipe name is one line
    if part not in STEPS:
        raise ValueError(f"{part!r} is not a recipe step ({', '.join(STEPS)})")
    return importlib.import_module(f"stages.recipes.{name}.{part}")
