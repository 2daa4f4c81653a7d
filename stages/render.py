"""Stage `render`: the XTuner config of the recipe, rendered from params with a Jinja2 template.

`auto` settings are resolved against this machine (device, precision, DeepSpeed stage, compute
dtype, and from the GPU's memory the micro-batch, accumulation and activation checkpointing: see
stages/memory.py) and written as literal values, with the DeepSpeed JSON beside the config when one
is used.
The rendered file is loaded back with mmengine as a check. Output: models/config/.

Each recipe's template is its package's template.py.j2 (stages/recipes/<recipe>/). Recipe `internvl` renders it (XTuner's internvl_v2_internlm2_2b_qlora_finetune
as the tutorial edits it) the same way, with the llava recipe's batch rule.

Recipe `llava` renders XTuner's LLaVA fine-tune (QLoRA LLM, LoRA vision encoder, LengthGroupedSampler)
to the same path; the same template's pretrain phase is rendered by the train stage, which runs it first. Its micro-batch is train.micro_batch when that is a number, else 1 (the memory planner
models the text recipe only); accumulation makes up train.global_batch as for the text recipe.

    python -m stages.render          # writes models/config/xtuner_config.py [+ deepspeed.json]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

from stages import params as P
from stages.paths import CONFIG_DIR
from stages.plan import fp8_off, resolve_here, write_config


def render(p: P.Params, resolved: dict, out: Path = CONFIG_DIR) -> Path:
    """The selected recipe's config (stages/recipes/<recipe>/config.py) written to `out` and checked."""
    from stages import recipes

    return write_config(recipes.step(p.recipe, "config").text(p, resolved, out), resolved, out)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.render", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default=str(P.PARAMS), help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    params = P.load(args.params)
    resolved = resolve_here(params)
    print(f"[render] resolved for this machine: {json.dumps(resolved)}", flush=True)
    if resolved["memory_gb"] and resolved["estimate_gb"] and resolved["estimate_gb"] > resolved["memory_gb"]:
        print(f"[render] warning: this setting is estimated at {resolved['estimate_gb']} GB, over "
              f"train.memory_gb {resolved['memory_gb']}: it may run out of GPU memory", flush=True)
    if why := fp8_off(params, resolved):
        print(f"[render] train.fp8 is off for this run: {why}", flush=True)
    path = render(params, resolved)
    print(f"[render] {path}: {params.recipe} recipe, LoRA r={params.lora.r}, "
          f"quant {params.quant.mode}, {resolved['device']} {resolved['precision']}, "
          f"deepspeed {resolved['deepspeed']}", flush=True)




if __name__ == "__main__":
    from stages.errors import run

    run(main, stage="render")
