"""Stage `prepare`: the selected recipe's training data from its raw files (data/raw/<recipe>/).

    assistant   the self-cognition conversations of the tutorial's generate_data.py, generated from
                question/answer templates and mixed with general conversations
                (data/generated/assistant/self_cognition.jsonl; stages/recipes/assistant/generate.py)
    llava       the LLaVA records repeated, as the tutorial's `repeat.py -n` (data/generated/llava/)
    internvl    the CLoT-style records repeated (data/generated/internvl/)

    python -m stages.prepare
"""
from __future__ import annotations

import argparse
from typing import Sequence

from stages import params as P


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default=str(P.PARAMS), help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    params = P.load(args.params)
    from stages import recipes

    print(f"[prepare] {recipes.step(params.recipe, 'prepare').prepare(params)}", flush=True)


if __name__ == "__main__":
    from stages.errors import run

    run(main, stage="prepare")
