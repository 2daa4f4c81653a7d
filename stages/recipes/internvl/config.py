"""The internvl recipe's XTuner config: template.py.j2 (XTuner's internvl_v2_internlm2_2b_qlora_finetune as
the tutorial edits it) and its variables."""
from __future__ import annotations

from pathlib import Path

from stages import params as P
from stages.paths import CONFIG_DIR, INTERNVL_MODEL, TRAIN_WORK, VALIDATED_INTERNVL
from stages.plan import llava_batch, render_text, run_settings

TEMPLATE = Path(__file__).with_name("template.py.j2")


def internvl_context(p: P.Params, resolved: dict, out: Path = CONFIG_DIR) -> dict:
    """The internvl template's variables (XTuner's internvl_v2_internlm2_2b_qlora_finetune, the tutorial's
    edits: LoRA from `lora`, whose `auto` is the tutorial's r 128 / alpha 256, schedule from `internvl`)."""
    t = p.train
    ds = resolved["deepspeed"]
    return {
        "header": "Rendered by `dvc repro render` (stages/recipes/internvl/template.py.j2) from params.yaml. Do not edit: "
                  "change params.yaml.",
        "command": f"python -m xtuner.tools.train {out / 'xtuner_config.py'} --work-dir {TRAIN_WORK}" + (
            f" --deepspeed {out / 'deepspeed.json'}" if ds != "none" else ""),
        "model_path": str(INTERNVL_MODEL), "data_path": str(VALIDATED_INTERNVL), "image_folder": p.data.internvl.image_folder,
        "max_length": p.data.max_length, "batch_size": resolved["micro_batch"], "grad_accum": resolved["grad_accum"],
        "lr": t.lr, "betas": tuple(t.betas), "weight_decay": t.weight_decay, "max_norm": t.max_norm,
        "warmup_iters": t.warmup_iters, "max_iters": t.max_iters,
        "save_interval": min(t.save_interval, t.max_iters), "save_total_limit": t.save_total_limit,
        "quantization_llm": p.quant.mode != "none", "torch_dtype": resolved["torch_dtype"],
        "lora": {"r": p.lora.r, "alpha": p.lora.alpha, "dropout": p.lora.dropout,
                 "target_modules": resolved["lora_targets"]},
        "seed": t.seed,
        **run_settings(resolved, t.max_iters),
        "pipeline": {**resolved, "recipe": "internvl", "quant": p.quant.mode,
                     "deepspeed_config": "deepspeed.json" if ds != "none" else None},
    }




def text(p: P.Params, resolved: dict, out: Path = CONFIG_DIR) -> str:
    return render_text(TEMPLATE, internvl_context(p, llava_batch(p, resolved), out))
