"""Stage `select`: which checkpoint the rest of the pipeline uses.

The self-cognition tutorial trains an assistant that learns its name, then answers everything with it
("很明显，出现了过拟合"); its remedy is to save checkpoints often, chat with each, and keep the one that
learned the identity without losing its general knowledge. This stage does that by rule. Every
checkpoint the train stage kept (models/checkpoints/iter_N.pth, each train.save_interval
iterations, and the last) is asked the evaluate stage's prompts with one loaded base model, several
checkpoints at a time in one batch, each row with its checkpoint's LoRA adapter beside the base weights
(recipe assistant), and scored as evaluate scores the merged model: identity hit rate on trained and
held-out questions, the share of general answers naming the identity, perplexity of held-out general
conversations. With `select.during_training` (auto: on one GPU with room), the train stage runs that
scoring beside its trainer as the checkpoints are saved, three at a time, and this stage reads those
scores back (models/work/scores/, each under a digest of the checkpoint and of
everything its score depends on; any other checkpoint is scored here). `select.rule` picks one:

  best   the highest held-out identity hit rate among checkpoints whose general leak is at most
         select.max_leak and whose perplexity is at most (1 + select.max_perplexity_rise) x the base
         model's; ties go to the earlier checkpoint; when none is within the limits, the highest
         held-out hit rate minus leak, said on the terminal and in choice.json
  last   the final checkpoint, as a run without this stage would use

Outputs: models/adapter.pth (the chosen checkpoint's adapter weights, read by convert, merge and
evaluate), reports/select/scores.json (a DVC plot over the step: `dvc plots diff` overlays two
experiments' curves), reports/select/choice.json (a DVC metric) and reports/select/answers.jsonl (every
checkpoint's answers). The report stage draws the scores (reports/curves.png) and shows the chosen
checkpoint's answers beside the last one's.

    python -m stages.select
"""
from __future__ import annotations

import argparse
import os
from typing import Sequence

from stages import params as P
from stages.io import write_json, write_jsonl
from stages.paths import SELECT


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.select", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default=str(P.PARAMS), help="params file (default: params.yaml)")
    parser.add_argument("--during-training", action="store_true", help=argparse.SUPPRESS)  # the train stage's
    args = parser.parse_args(argv)
    from stages import recipes
    from stages.paths import CONFIG
    from stages.xtuner_api import read_pipeline

    params = P.load(args.params)
    if args.during_training:  # started by the train stage beside its trainer (select.during_training)
        from stages.errors import leave_unrecorded

        leave_unrecorded()
        os.nice(10)  # background work beside the trainer (stages/train.py start_scorer)
        line = recipes.step(params.recipe, "select").follow(params, read_pipeline(CONFIG))
        print(f"[select] {line}", flush=True)
        return
    P.log_section("select", params.select)
    step = recipes.step(params.recipe, "select")  # stages/recipes/<recipe>/select.py
    choice, scores, answers, line = step.run(params, read_pipeline(CONFIG))
    write_json(SELECT / "scores.json", scores)
    write_json(SELECT / "choice.json", choice)
    write_jsonl(SELECT / "answers.jsonl", answers)
    print(f"[select] {line}", flush=True)


if __name__ == "__main__":
    from stages.errors import run

    run(main, stage="select")
