"""Stage `merge`: the adapter merged into the base model, saved as safetensors, then checked.

The check: on fixed prompts (the evaluation prompts through the chat template), the logits of
base+adapter (peft, unmerged) and of the merged model, both in float32, must agree within
`assistant.merge_tolerance`. The largest difference is a metric (reports/merge.json); a mismatch fails the
stage. The merged model is then cast to `assistant.merge_dtype` and saved with the base model's tokenizer and
remote-code files, ready for `AutoModelForCausalLM.from_pretrained` or LMDeploy.

Recipe llava: XTuner's own merge tool, as the tutorial runs it twice: the LLM with llm_adapter, the CLIP
with visual_encoder_adapter (`--is-clip`); the projector copied beside them (models/merged/llm/,
visual_encoder/, projector/). Checked the same way, on the evaluation images: base models + adapters
against the merged parts, both loaded in float32. XTuner saves the merged LLM in float16, so the
tolerance is `llava.merge_tolerance` (about 8e-3 is what float16 weights cost the tiny models).

Recipe internvl: XTuner's convert_to_official (merges LoRA, saves bfloat16), the model's remote-code files
copied in (the tool does not), checked as above against the trained model (stages/recipes/internvl/steps.py).

    python -m stages.merge           # writes models/merged/, reports/merge.json
"""
from __future__ import annotations

import argparse
from typing import Sequence

from stages import params as P
from stages.io import write_json
from stages.paths import MERGE_METRICS


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.merge", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default=str(P.PARAMS), help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    from stages import recipes
    from stages.xtuner_api import lean_imports

    params = P.load(args.params)
    lean_imports(images=params.recipe != "assistant")
    metrics, lines = recipes.step(params.recipe, "merge").run(params)  # stages/recipes/<recipe>/merge.py
    write_json(MERGE_METRICS, metrics)
    for line in lines:
        print(f"[merge] {line}", flush=True)


if __name__ == "__main__":
    from stages.errors import run

    run(main, stage="merge")
