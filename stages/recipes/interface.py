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
    SCORES_CHECKPOINTS: bool  # its select step scores checkpoints, and can score them beside the trainer (`follow`)


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


class Validate(Protocol):
    """stages/recipes/<name>/validate.py (`step(name, "validate")`)."""

    def run(self, p: Any, template: dict) -> tuple[list, dict]:
        """Stage validate: the prepared records checked and measured (stages/dataset.py) with XTuner's
        prompt `template`; (the records kept, their statistics for reports/data_stats.json)."""


class Train(Protocol):
    """stages/recipes/<name>/train.py (`step(name, "train")`)."""

    def setup(self, pipeline: dict) -> None:
        """In every training process: what XTuner's model class of the recipe needs patched."""

    def before(self, p: Any) -> dict:
        """Before the trainer (llava: its projector phase); what it reads: `data`, `model`, and optional
        `extra` folders, `extra_models`, `projector_before` (kept in models/adapter.pth)."""

    def tokens_per_iter(self, pipeline: dict) -> float | None:
        """Tokens per iteration where XTuner's throughput hook does not count them, else None."""


class Config(Protocol):
    """stages/recipes/<name>/config.py (`step(name, "config")`)."""

    def text(self, p: Any, resolved: dict, out: Path) -> str:
        """Stage render: the recipe's XTuner config (its template filled for `resolved`, the settings
        stages.plan resolved for this machine), to be written into `out`."""


class Select(Protocol):
    """stages/recipes/<name>/select.py (`step(name, "select")`)."""

    def run(self, p: Any, pipeline: dict) -> tuple[dict, list[dict], list[dict], str]:
        """Stage select: the checkpoints in models/checkpoints/ scored, the chosen one copied to
        models/adapter.pth; (choice.json's metrics, scores.json's rows, answers.jsonl's rows, a line)."""

    def follow(self, p: Any, pipeline: dict) -> str:
        """Only where SCORES_CHECKPOINTS: beside the trainer (`python -m stages.select --during-training`,
        started by the train stage), each checkpoint scored as it is saved, until the trainer is done; the
        scores kept where `run` reads them back; a summary line."""


class Convert(Protocol):
    """stages/recipes/<name>/convert.py (`step(name, "convert")`)."""

    def run(self, p: Any, pipeline: dict) -> None:
        """Stage convert: models/adapter.pth (the select stage's) into models/adapter/; `pipeline` is the
        rendered config's resolved settings."""


class Merge(Protocol):
    """stages/recipes/<name>/merge.py (`step(name, "merge")`)."""

    def run(self, p: Any) -> tuple[dict, list[str]]:
        """Stage merge: models/merged/ from the base model and the adapter, checked; (the metrics for
        reports/merge.json, the lines to print)."""


class Evaluate(Protocol):
    """stages/recipes/<name>/evaluate.py (`step(name, "evaluate")`)."""

    def run(self, p: Any) -> tuple[list[dict], dict, str]:
        """Stage evaluate: the base and the tuned model asked the same; (rows for generations.jsonl, the
        metrics, a summary line)."""


class Report(Protocol):
    """stages/recipes/<name>/report.py (`step(name, "report")`)."""

    def build(self, p: Any) -> tuple[str, dict]:
        """Stage report: (reports/report.md's Markdown, the headline numbers for reports/metrics.json)."""
