"""Stage `render`: the XTuner config of the recipe, rendered from params with a Jinja2 template.

`auto` settings are resolved against this machine (device, precision, DeepSpeed stage, compute
dtype, and from the GPU's memory the micro-batch, accumulation and activation checkpointing: see
stages/memory.py) and written as literal values, with the DeepSpeed JSON beside the config when one
is used.
The rendered file is loaded back with mmengine as a check. Output: models/config/.

Recipe `internvl` renders stages/templates/internvl.py.j2 (XTuner's internvl_v2_internlm2_2b_qlora_finetune
as the tutorial edits it) the same way, with the llava recipe's batch rule.

Recipe `llava` renders stages/templates/llava.py.j2 (XTuner's LLaVA fine-tune: QLoRA LLM, LoRA vision
encoder, LengthGroupedSampler) to the same path; the same template's pretrain phase is rendered by the
pretrain stage. Its micro-batch is train.micro_batch when that is a number, else 1 (the memory planner
models the text recipe only); accumulation makes up train.global_batch as for the text recipe.

    python -m stages.render          # writes models/config/xtuner_config.py [+ deepspeed.json]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

from stages import memory
from stages import params as P
from stages.errors import fail
from stages.structures import lora_targets
from stages.io import output_dir, write_json
from stages.modeldir import read_config
from stages.paths import (CONFIG_DIR, PRETRAIN, PRETRAIN_WORK, TEMPLATES, TRAIN_WORK, VALIDATED_ASSISTANT,
                          VALIDATED_INTERNVL, VALIDATED_LLAVA)

LLAVA_TEXT = PRETRAIN / "llava_text"  # the pretrain stage's tokenized LLaVA text (both phases read it)
PROJECTOR_PTH = PRETRAIN / "projector.pth"  # the projector the fine-tune starts from

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def machine() -> dict:
    """What `auto` is resolved against: is a CUDA GPU visible, does it have bf16, its memory."""
    import torch

    cuda = torch.cuda.is_available()
    card = torch.cuda.get_device_properties(0).total_memory / memory.GB if cuda else None
    return {"cuda": cuda, "bf16": cuda and torch.cuda.is_bf16_supported(), "card_gb": card}


def resolve(p: P.Params, cuda: bool, bf16: bool, card_gb: float | None = None,
            shape: dict | None = None) -> dict:
    """Every `auto` in params made concrete for a machine; pure, so it is tested for both kinds."""
    t = p.train
    device = t.device if t.device != "auto" else ("cuda" if cuda else "cpu")
    if device == "cuda" and not cuda:
        fail("train.device: cuda, but no CUDA GPU is visible here (set train.device: auto or cpu)")
    precision = t.precision if t.precision != "auto" else (
        ("bf16" if bf16 else "fp16") if device == "cuda" else "fp32")
    if precision == "bf16" and device == "cuda" and not bf16:
        fail("train.precision: bf16, but this GPU has no bf16 (use fp16 or auto)")
    deepspeed = t.deepspeed if t.deepspeed != "auto" else (
        "zero2" if device == "cuda" and t.gpus > 1 else "none")
    if t.optimizer != "adamw" and device == "cpu":
        fail(f"train.optimizer: {t.optimizer} needs a GPU, and this run trains on the CPU; use adamw")
    compute = p.quant.compute_dtype if p.quant.compute_dtype != "auto" else DTYPES[precision]
    budget = None
    if device == "cuda":
        budget = t.memory_gb if t.memory_gb != "auto" else round(0.9 * (card_gb or 80), 1)
    chunk = memory.loss_chunk_bytes(budget)
    targets = lora_targets({"architectures": [(shape or {}).get("arch")]}, p.lora.target_modules)
    batch = memory.plan(
        shape or {}, budget_gb=budget, seq=p.data.max_length, global_batch=t.global_batch, gpus=t.gpus,
        micro_batch=t.micro_batch, checkpointing=t.activation_checkpointing,  # no budget (CPU): all, none
        quant=p.quant.mode, compute_bytes=2 if compute != "float32" else 4, lora_r=p.lora.r,
        optimizer=t.optimizer, upcast_frozen=p.quant.upcast_frozen, fused_loss=t.fused_loss, loss_chunk=chunk,
        targets=targets)
    return {"device": device, "precision": precision, "deepspeed": deepspeed, "gpus": t.gpus,
            "torch_dtype": DTYPES[precision], "compute_dtype": compute, "memory_gb": budget,
            "micro_batch": batch["micro_batch"], "grad_accum": batch["grad_accum"],
            "checkpointing": batch["checkpointing"], "estimate_gb": batch["estimate_gb"],
            "fused_loss": t.fused_loss, "loss_chunk_mb": chunk // 2**20,
            "compile_layers": t.compile_layers if t.compile_layers != "auto" else (
                device == "cuda" and deepspeed == "none" and t.gpus == 1),
            "upcast_frozen": p.quant.upcast_frozen or p.quant.mode == "none",
            "lora_targets": targets, "max_length": p.data.max_length}


def resolve_here(p: P.Params, machine_facts: dict | None = None) -> dict:
    """resolve for this machine (or the one described), with the shape of the model at model.path;
    the image recipes' batch settings applied. What every stage that renders a config uses."""
    resolved = resolve(p, **(machine_facts or machine()), shape=memory.shape_of(p.model.path))
    if p.recipe == "internvl":  # LoRA goes on the InternVL model's own LLM
        llm = read_config(p.internvl.path, "internvl.path").get("llm_config", {})
        resolved["lora_targets"] = lora_targets(llm if isinstance(llm, dict) else {}, "all-linear")
    return llava_batch(p, resolved) if p.recipe in ("llava", "internvl") else resolved


def run_settings(resolved: dict, max_iters: int | None) -> dict:
    """What every recipe's template takes alike from the resolved settings: the optimizer wrapper
    (mmengine's AMP one unless fp32; loss scaling for fp16 only), the log interval (every step on a
    CPU, else 10, or fewer when the run is shorter) and the distributed backend."""
    amp = resolved["precision"] != "fp32"
    return {"optim_wrapper": "AmpOptimWrapper" if amp else "OptimWrapper",
            "amp_dtype": DTYPES[resolved["precision"]] if amp else None,
            "loss_scale": "dynamic" if resolved["precision"] == "fp16" else None,
            "log_interval": 1 if resolved["device"] == "cpu" else min(10, max_iters or 10),
            "dist_backend": "nccl" if resolved["device"] == "cuda" else "gloo"}


def context(p: P.Params, resolved: dict, out: Path = CONFIG_DIR) -> dict:
    """The template's variables: params and resolved settings, as literal values."""
    t, ds = p.train, resolved["deepspeed"]
    command = f"python -m xtuner.tools.train {out / 'xtuner_config.py'} --work-dir {TRAIN_WORK}" + (
        f" --deepspeed {out / 'deepspeed.json'}" if ds != "none" else "")
    if resolved["gpus"] > 1:
        command = f"NPROC_PER_NODE={resolved['gpus']} torchrun --nproc-per-node {resolved['gpus']} " \
                  f"-m xtuner.tools.train ... --launcher pytorch"
    return {
        "header": "Rendered by `dvc repro render` (stages/render.py, stages/templates/assistant.py.j2) "
                  "from params.yaml. Do not edit: change params.yaml.",
        "command": command,
        "model_path": p.model.path, "data_path": str(VALIDATED_ASSISTANT),
        "prompt_template": t.prompt_template, "max_length": p.data.max_length, "pack": t.pack,
        "micro_batch": resolved["micro_batch"], "grad_accum": resolved["grad_accum"], "gpus": t.gpus,
        "tokens_per_step": t.global_batch * p.data.max_length, "checkpointing": resolved["checkpointing"],
        "optimizer": {"adamw": "AdamW", "adamw8bit": "AdamW8bit", "paged_adamw8bit": "PagedAdamW8bit"}[t.optimizer],
        "lr": t.lr, "betas": tuple(t.betas), "weight_decay": t.weight_decay, "max_norm": t.max_norm,
        "warmup_iters": t.warmup_iters, "epochs": t.epochs, "max_iters": t.max_iters,
        "save_interval": t.save_interval, "save_total_limit": t.save_total_limit, "seed": t.seed,
        "eval_interval": p.eval.interval, "system": p.eval.system, "prompts": list(p.eval.prompts),
        "max_new_tokens": p.eval.max_new_tokens,
        "torch_dtype": resolved["torch_dtype"], "compute_dtype": resolved["compute_dtype"],
        "quant": None if p.quant.mode == "none" else p.quant.mode, "double_quant": p.quant.double_quant,
        "lora_r": p.lora.r, "lora_alpha": p.lora.alpha, "lora_dropout": p.lora.dropout,
        "target_modules": resolved["lora_targets"],
        **run_settings(resolved, t.max_iters),
        "map_num_proc": 1 if resolved["device"] == "cpu" else 8,
        "pipeline": {**resolved, "deepspeed_config": "deepspeed.json" if ds != "none" else None},
    }


def llava_batch(p: P.Params, resolved: dict) -> dict:
    """The llava recipe's micro-batch (train.micro_batch when a number, else 1) and the accumulation that
    makes up train.global_batch; no activation checkpointing, no fused loss, no compiled layers (the
    kernels module serves the text recipe's model class)."""
    t = p.train
    micro = t.micro_batch if isinstance(t.micro_batch, int) else 1
    accum = max(1, t.global_batch // (micro * t.gpus))
    return {**resolved, "micro_batch": micro, "grad_accum": accum, "checkpointing": False, "estimate_gb": None,
            "fused_loss": False, "compile_layers": False}


def llava_context(p: P.Params, resolved: dict, phase: str, out: Path = CONFIG_DIR) -> dict:
    """The llava template's variables for `phase` (pretrain: the projector alone; finetune)."""
    from stages.vision import encoder_image_tokens

    lv, t = p.llava, p.train
    ph = lv.pretrain if phase == "pretrain" else lv.finetune
    tokens = encoder_image_tokens(p)
    name = "pretrain_config.py" if phase == "pretrain" else "xtuner_config.py"
    work = PRETRAIN_WORK if phase == "pretrain" else TRAIN_WORK
    ds = resolved["deepspeed"]
    lora = p.lora
    return {
        "header": f"Rendered by `dvc repro {'pretrain' if phase == 'pretrain' else 'render'}` "
                  "(stages/templates/llava.py.j2) from params.yaml. Do not edit: change params.yaml.",
        "run_it": f"dvc repro {'pretrain' if phase == 'pretrain' else 'train'}",
        "command": f"python -m xtuner.tools.train {out / name} --work-dir {work}" + (
            f" --deepspeed {CONFIG_DIR / 'deepspeed.json'}" if ds != "none" else ""),
        "phase": phase, "llm_path": p.model.path, "visual_encoder_path": lv.visual_encoder,
        "pretrained_pth": str(PROJECTOR_PTH) if phase == "finetune" else None,
        "data_path": str(VALIDATED_LLAVA), "text_folder": str(LLAVA_TEXT),
        "image_folder": p.data.llava.image_folder, "prompt_template": t.prompt_template,
        "max_length": p.data.max_length - tokens, "total_length": p.data.max_length, "image_tokens": tokens,
        "batch_size": resolved["micro_batch"], "grad_accum": resolved["grad_accum"],
        "lr": ph.lr, "betas": tuple(t.betas), "weight_decay": t.weight_decay, "max_norm": t.max_norm,
        "warmup_iters": ph.warmup_iters, "max_iters": ph.max_iters,
        "save_interval": min(t.save_interval, ph.max_iters), "save_total_limit": t.save_total_limit,
        "eval_interval": p.eval.interval, "system": p.eval.system,
        "eval_image": str(Path(p.data.llava.image_folder) / lv.eval_images[0]),
        "eval_prompts": [lv.eval_prompt or "请描述这张图片。"], "max_new_tokens": p.eval.max_new_tokens,
        "torch_dtype": resolved["torch_dtype"], "compute_dtype": resolved["compute_dtype"],
        "quant": None if p.quant.mode == "none" else p.quant.mode, "double_quant": p.quant.double_quant,
        "llm_lora": {"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout,
                     "target_modules": resolved["lora_targets"]},
        "visual_lora": {"r": lv.visual_lora.r, "alpha": lv.visual_lora.alpha, "dropout": lv.visual_lora.dropout,
                        "target_modules": None},
        "visual_select_layer": -2, "seed": t.seed,
        **run_settings(resolved, ph.max_iters),
        "pipeline": {**resolved, "recipe": "llava", "phase": phase, "image_tokens": tokens,
                     "deepspeed_config": "deepspeed.json" if ds != "none" else None},
    }


def internvl_context(p: P.Params, resolved: dict, out: Path = CONFIG_DIR) -> dict:
    """The internvl template's variables (XTuner's internvl_v2_internlm2_2b_qlora_finetune, the tutorial's
    edits: LoRA from `lora`, whose `auto` is the tutorial's r 128 / alpha 256, schedule from `internvl`)."""
    iv, t = p.internvl, p.train
    ds = resolved["deepspeed"]
    return {
        "header": "Rendered by `dvc repro render` (stages/templates/internvl.py.j2) from params.yaml. Do not edit: "
                  "change params.yaml.",
        "command": f"python -m xtuner.tools.train {out / 'xtuner_config.py'} --work-dir {TRAIN_WORK}" + (
            f" --deepspeed {out / 'deepspeed.json'}" if ds != "none" else ""),
        "model_path": iv.path, "data_path": str(VALIDATED_INTERNVL), "image_folder": p.data.internvl.image_folder,
        "max_length": p.data.max_length, "batch_size": resolved["micro_batch"], "grad_accum": resolved["grad_accum"],
        "lr": iv.lr, "betas": tuple(t.betas), "weight_decay": t.weight_decay, "max_norm": t.max_norm,
        "warmup_iters": iv.warmup_iters, "max_iters": iv.max_iters,
        "save_interval": min(t.save_interval, iv.max_iters), "save_total_limit": t.save_total_limit,
        "quantization_llm": p.quant.mode != "none", "torch_dtype": resolved["torch_dtype"],
        "lora": {"r": p.lora.r, "alpha": p.lora.alpha, "dropout": p.lora.dropout,
                 "target_modules": resolved["lora_targets"]},
        "seed": t.seed,
        **run_settings(resolved, iv.max_iters),
        "pipeline": {**resolved, "recipe": "internvl", "quant": p.quant.mode,
                     "deepspeed_config": "deepspeed.json" if ds != "none" else None},
    }


def render_text(recipe: str, ctx: dict) -> str:
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True, autoescape=False)
    env.filters["py"] = repr
    return env.get_template(f"{recipe}.py.j2").render(**ctx)


def deepspeed_config(resolved: dict) -> dict:
    """The ZeRO JSON, with precision explicit (XTuner's `auto` would decide from the GPU alone)."""
    stage = int(resolved["deepspeed"][-1])
    return {
        "gradient_accumulation_steps": "auto", "train_micro_batch_size_per_gpu": "auto",
        "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "zero_optimization": {"stage": stage, "overlap_comm": True},
        "fp16": {"enabled": resolved["precision"] == "fp16", "initial_scale_power": 16},
        "bf16": {"enabled": resolved["precision"] == "bf16"},
    }


def check_config(path: Path) -> Any:
    """Load the rendered file the way XTuner will (mmengine, lazy imports)."""
    from stages.xtuner_api import load_config

    return load_config(path)


def render(p: P.Params, resolved: dict, out: Path = CONFIG_DIR) -> Path:
    if p.recipe == "llava":
        resolved = llava_batch(p, resolved)
        text = render_text("llava", llava_context(p, resolved, "finetune", out))
    elif p.recipe == "internvl":
        resolved = llava_batch(p, resolved)
        text = render_text("internvl", internvl_context(p, resolved, out))
    else:
        text = render_text(p.recipe, context(p, resolved, out))
    with output_dir(out) as tmp:
        (tmp / "xtuner_config.py").write_text(text, encoding="utf-8")
        if resolved["deepspeed"] != "none":
            write_json(tmp / "deepspeed.json", deepspeed_config(resolved))
        check_config(tmp / "xtuner_config.py")
    return out / "xtuner_config.py"


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
    path = render(params, resolved)
    print(f"[render] {path}: {params.recipe} recipe, LoRA r={params.lora.r}, "
          f"quant {params.quant.mode}, {resolved['device']} {resolved['precision']}, "
          f"deepspeed {resolved['deepspeed']}", flush=True)


if __name__ == "__main__":
    from stages.errors import run

    run(main, stage="render")
