"""What a recipe package provides to the stages: constants in `stages/recipes/<name>/__init__.py`
(`stages.recipes.get(name)`), and one module a step (`stages.recipes.step(name, part)`), each imported
alone so that a stage's code is only the step it runs.

A stage parses params.yaml, resolves the selected recipe, calls the recipe's step and records what it
did. A recipe package imports the shared modules and never a stage or another recipe
(tests/test_deps.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol


class Recipe(Protocol):
    """The package's constants (`stages.recipes.get(name)`)."""

    NAME: str
    VALIDATED: Path  # the validate stage's data file (under data/validated/<name>/), the only data training reads


class StandIn(Protocol):
    """stages/recipes/<name>/stand_in.py (`step(name, "stand_in")`)."""

    def build(self, p: Any, folder: Path) -> list[str]:
        """Stage stand_in: the recipe's stand-ins into `folder` (models/<recipe>/, one subfolder a role of
        paths.MODEL_ROLES); one summary line each."""


class Prepare(Protocol):
    """stages/recipes/<name>/prepare.py (`step(name, "prepare")`)."""

    def prepare(self, p: Any) -> str:
        """Stage prepare: the recipe's training data from data/raw/<name>/ into data/generated/<name>/; a
        summary line."""


class Config(Protocol):
    """stages/recipes/<name>/config.py (`step(name, "config")`)."""

    def text(self, p: Any, resolved: dict, out: Path) -> str:
        """Stage render: the recipe's XTuner config (its template filled for `resolved`, the settings
        stages.plan resolved for this machine), to be written into `out`."""
