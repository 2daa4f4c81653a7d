"""Stage `convert`: the trained adapter to Hugging Face format (peft, safetensors), with XTuner's
pth_to_hf from the same rendered config as training.

The adapter keeps the training precision: fp32 when training ran in fp32 (CPU), else XTuner's
fp16. `target_modules` in adapter_config.json is sorted, so the file is the same on every rerun.
Recipe llava: the same converter writes llm_adapter/, visual_encoder_adapter/ and projector/.
Recipe internvl: XTuner's pth_to_hf has no InternVL path; the trained weights (LoRA, mlp1) are checked and
saved as adapter.safetensors (stages/recipes/internvl/steps.py), and the merge stage runs convert_to_official.

    python -m stages.convert         # writes models/adapter/
"""
from __future__ import annotations

import argparse
from typing import Sequence

from stages import params as P
from stages.paths import ADAPTER, CONFIG


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default=str(P.PARAMS), help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    from stages import recipes
    from stages.xtuner_api import lean_imports, read_pipeline

    params = P.load(args.params)
    pipeline = read_pipeline(CONFIG)
    lean_imports(images=params.recipe != "assistant")
    recipes.step(params.recipe, "convert").run(params, pipeline)  # stages/recipes/<recipe>/convert.py
    files = sorted(p.name for p in ADAPTER.iterdir())
    print(f"[convert] {ADAPTER}: {', '.join(files)}", flush=True)


if __name__ == "__main__":
    from stages.errors import run

    run(main, stage="convert")
