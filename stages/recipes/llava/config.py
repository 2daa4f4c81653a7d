"""The llava recipe's XTuner config: template.py.j2 (XTuner's LLaVA fine-tune: QLoRA LLM, LoRA vision
encoder, LengthGroupedSampler; its pretrain phase too) and its variables."""
from __future__ import annotations

from pathlib import Path

from stages import params as P
from stages.paths import CONFIG_DIR, LLAVA_VISION, PRETRAIN, PRETRAIN_WORK, TRAIN_WORK, VALIDATED_LLAVA, llm_dir
from stages.plan import llava_batch, render_text, run_settings
from stages.recipes.llava import vision

TEMPLATE = Path(__file__).with_name("template.py.j2")
LLAVA_TEXT = PRETRAIN / "llava_text"  # the train stage's tokenized text (both phases read it)
PROJECTOR_PTH = PRETRAIN / "projector.pth"  # the projector the fine-tune starts from (written by the train stage)


def llava_context(p: P.Params, resolved: dict, phase: str, out: Path = CONFIG_DIR) -> dict:
    """The llava template's variables for `phase` (pretrain: the projector alone; finetune)."""
    lv, t = p.llava, p.train
    ph = lv.pretrain if phase == "pretrain" else t  # the fine-tune: the train section's schedule
    tokens = vision.encoder_image_tokens(p)
    name = "pretrain_config.py" if phase == "pretrain" else "xtuner_config.py"
    work = PRETRAIN_WORK if phase == "pretrain" else TRAIN_WORK
    ds = resolved["deepspeed"]
    lora = p.lora
    return {
        "header": f"Rendered by `dvc repro {'train' if phase == 'pretrain' else 'render'}` "
                  "(stages/recipes/llava/template.py.j2) from params.yaml. Do not edit: change params.yaml.",
        "run_it": "dvc repro train",
        "command": f"python -m xtuner.tools.train {out / name} --work-dir {work}" + (
            f" --deepspeed {CONFIG_DIR / 'deepspeed.json'}" if ds != "none" else ""),
        "phase": phase, "llm_path": str(llm_dir(p.recipe)), "visual_encoder_path": str(LLAVA_VISION),
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




def text(p: P.Params, resolved: dict, out: Path = CONFIG_DIR) -> str:
    """The fine-tune's config (the render stage's); the pretrain phase's is rendered by the train stage."""
    return render_text(TEMPLATE, llava_context(p, llava_batch(p, resolved), "finetune", out))
