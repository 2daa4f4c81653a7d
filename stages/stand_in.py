"""Stage `stand_in`: tiny stand-ins of the selected recipe's models, with the real structures.

With `stand_in: {tiny: ...}` in params.yaml, `dvc repro` runs this stage as stand_in@tiny and writes the
selected recipe's model folder, models/<recipe>/ (stages/paths.py MODEL_ROLES):

  assistant  llm      internlm2-chat-1_8b's stand-in: InternLM2 remote code, a SentencePiece tokenizer laid
                      out as InternLM2's, pretrained on the assistant's general conversations (stages/base.py)
  llava      llm      the same, and
             vision   a CLIP vision encoder (stages/recipes/llava/vision.py)
  internvl   model    InternVL2-2B's structure around the LLM stand-in (stages/recipes/internvl/model.py)

Only the selected recipe's are built; with `stand_in: {}` (your own models, linked in with
`python -m stages.link`) the stage does not exist. Same params, same bytes.

    python -m stages.stand_in        # writes models/<recipe>/
"""
from __future__ import annotations

import argparse
from typing import Sequence

from stages import params as P
from stages.paths import STAND_IN_MARK, model_folder


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.stand_in", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default=str(P.PARAMS), help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    params = P.load(args.params)
    if params.stand_in is None:
        from stages.errors import fail

        fail("stand_in: {} builds nothing (your models are linked into models/<recipe>/)")
    from stages import recipes
    from stages.io import output_dir

    folder = model_folder(params.recipe)
    with output_dir(folder) as tmp:
        for line in recipes.step(params.recipe, "stand_in").build(params, tmp):
            print(f"[stand_in] {folder}/{line}", flush=True)
        for role in tmp.iterdir():
            (role / STAND_IN_MARK).write_text("built by `dvc repro stand_in@tiny` (params.yaml stand_in.tiny); "
                                              "`python -m stages.link` replaces it with your model\n")
    print(f"[stand_in] {folder}: {', '.join(sorted(p.name for p in folder.iterdir()))} for recipe "
          f"{params.recipe}", flush=True)


if __name__ == "__main__":
    from stages.errors import run

    run(main, stage="stand_in")
