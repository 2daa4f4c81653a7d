"""Stage `evaluate`: ask the base and the fine-tuned model the same prompts, and measure the change.

Three kinds of prompt, each through the model's chat template with the same greedy decoding:
`trained` (the tutorial's, also in the training data), `heldout` (paraphrases never trained on) and
`general` (nothing to do with identity). Measured for both models:

  identity hit rate      share of answers naming both the assistant and its author (trained, heldout)
  general identity leak  share of general answers that name the assistant or author anyway: the
                         tutorial's fine-tune ended up answering everything with its identity sentence
  perplexity             of held-out general conversations (forgetting shows as a rise)
  answer length, tokens/s

Outputs: reports/eval/generations.jsonl (prompt, kind, base, tuned) and reports/eval/metrics.json.

Recipe llava, as the tutorial asks about a test image before and after fine-tuning: each of
`llava.eval_images` with `llava.eval_prompt` (or the image's own first question in the data), asked of
the model before fine-tuning (the LLM, the vision encoder and the pretrained projector) and of the
merged fine-tune, greedy. Measured for both: the share of answers equal to the data's answer for that
image, their mean similarity to it (difflib ratio), answer length and tokens/s. Rows (kind `image`)
also hold the image and the reference answer.

Recipe internvl, as the tutorial asks InternVL2-2B about a picture: each of `internvl.eval_images` with
`internvl.eval_prompt` ("请你根据这张图片，讲一个脑洞大开的梗"), asked of `internvl.path` and of the converted
fine-tune, greedy, through the model's own chat() (transformers), or on a GPU host through LMDeploy with
the `internvl2-internlm2` chat template (eval.backend; stages/recipes/internvl/steps.py). Measured as for llava,
against each image's caption in the data.

    python -m stages.evaluate
"""
from __future__ import annotations

import argparse
from typing import Sequence

from stages import params as P
from stages.io import write_json, write_jsonl
from stages.paths import EVAL_METRICS, GENERATIONS


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default=str(P.PARAMS), help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    from stages import recipes

    params = P.load(args.params)
    P.log_section("evaluate", params.eval)
    rows, metrics, line = recipes.step(params.recipe, "evaluate").run(params)  # stages/recipes/<recipe>/evaluate.py
    write_jsonl(GENERATIONS, rows)
    write_json(EVAL_METRICS, metrics)
    print(f"[evaluate] {line}", flush=True)


if __name__ == "__main__":
    from stages.errors import run

    run(main, stage="evaluate")
