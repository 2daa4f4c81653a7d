"""The assistant recipe's XTuner config: template.py.j2 (XTuner's internlm2_chat_1_8b_qlora_alpaca_e3 as the
tutorial edits it) and its variables."""
from __future__ import annotations

from pathlib import Path

from stages import params as P
from stages.paths import CONFIG_DIR, SNAPSHOTS, TRAIN_WORK, VALIDATED_ASSISTANT, llm_dir
from stages.plan import render_text, run_settings

TEMPLATE = Path(__file__).with_name("template.py.j2")


def context(p: P.Params, resolved: dict, out: Path = CONFIG_DIR) -> dict:
    """The template's variables: params and resolved settings, as literal values."""
    t, ds = p.train, resolved["deepspeed"]
    command = f"python -m xtuner.tools.train {out / 'xtuner_config.py'} --work-dir {TRAIN_WORK}" + (
        f" --deepspeed {out / 'deepspeed.json'}" if ds != "none" else "")
    if resolved["gpus"] * resolved["nodes"] > 1:
        nodes = f"--nnodes {resolved['nodes']} --node-rank N --master-addr NODE0 " if resolved["nodes"] > 1 else ""
        command = f"NPROC_PER_NODE={resolved['gpus']} torchrun {nodes}--nproc-per-node {resolved['gpus']} " \
                  f"-m xtuner.tools.train ... --launcher pytorch"
    return {
        "header": "Rendered by `dvc repro render` (stages/render.py, stages/recipes/assistant/template.py.j2) "
                  "from params.yaml. Do not edit: change params.yaml.",
        "command": command,
        "model_path": str(llm_dir(p.recipe)), "data_path": str(VALIDATED_ASSISTANT),
        "prompt_template": t.prompt_template, "max_length": p.data.max_length, "pack": t.pack,
        "micro_batch": resolved["micro_batch"], "grad_accum": resolved["grad_accum"], "gpus": t.gpus,
        "compile_layers": bool(resolved.get("compile_layers")),
        "tokens_per_step": t.global_batch * p.data.max_length, "checkpointing": resolved["checkpointing"],
        "optimizer": {"adamw": "AdamW", "adamw8bit": "AdamW8bit", "paged_adamw8bit": "PagedAdamW8bit"}[t.optimizer],
        "lr": t.lr, "betas": tuple(t.betas), "weight_decay": t.weight_decay, "max_norm": t.max_norm,
        "warmup_iters": t.warmup_iters, "epochs": t.epochs, "max_iters": t.max_iters,
        "save_interval": t.save_interval, "save_total_limit": t.save_total_limit, "seed": t.seed,
        "snapshots": str(SNAPSHOTS),
        "eval_interval": p.eval.interval, "system": p.eval.system, "prompts": list(p.assistant.prompts),
        "max_new_tokens": p.eval.max_new_tokens,
        "torch_dtype": resolved["torch_dtype"], "compute_dtype": resolved["compute_dtype"],
        "quant": None if p.quant.mode == "none" else p.quant.mode, "double_quant": p.quant.double_quant,
        "lora_r": p.lora.r, "lora_alpha": p.lora.alpha, "lora_dropout": p.lora.dropout,
        "target_modules": resolved["lora_targets"],
        **run_settings(resolved, t.max_iters),
        "map_num_proc": 1 if resolved["device"] == "cpu" else 8,
        "pipeline": {**resolved, "deepspeed_config": "deepspeed.json" if ds != "none" else None},
    }




def text(p: P.Params, resolved: dict, out: Path = CONFIG_DIR) -> str:
    return render_text(TEMPLATE, context(p, resolved, out))
