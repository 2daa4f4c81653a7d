"""The llava recipe's first phase, run by the train stage before the fine-tune: the tokenized text
and the projector the fine-tune starts from, in models/pretrain/ (the train stage's working folder).

  1. data/validated/llava/train.json tokenized once, as XTuner's LLaVADataset would
     (stages/recipes/llava/model.py), to models/pretrain/llava_text/; both phases' configs read it
     (`offline_processed_text_folder`).
  2. The projector: from `llava.pretrained_pth` when given (checked against the LLM and the vision
     encoder first: XTuner loads it with strict=False and would ignore a wrong file silently), else
     trained here with XTuner's LLaVA pretrain phase (LLM and vision encoder frozen, `llava.pretrain`),
     from models/pretrain/pretrain_config.py rendered with the llava template. Either way its weights go
     to models/pretrain/projector.pth, the fine-tune's `pretrained_pth`, and into models/adapter.pth
     (the evaluate stage's model before fine-tuning).

The file at `llava.pretrained_pth` is read when the stage runs; DVC reruns the stage when the param
changes, not when the file at the same path is replaced (`dvc repro -f train` then).
"""
from __future__ import annotations

import time
from pathlib import Path

from stages import params as P
from stages.paths import LLAVA_VISION, PRETRAIN_WORK, VALIDATED_LLAVA, llm_dir


def prepare(p: P.Params, out: Path) -> dict:
    """Everything of the stage for the llava recipe, into `out` (whole or not at all)."""
    import torch

    from stages import plan
    from stages.recipes.llava import model as llava
    from stages.recipes.llava.config import llava_context
    from stages.io import output_dir, write_json
    from stages.modeldir import check

    llm, vit = llm_dir(p.recipe), LLAVA_VISION
    check(llm)
    if not (vit / "config.json").is_file():
        from stages.errors import fail
        from stages.modeldir import how_to_get

        fail(f"{vit}: no config.json (the CLIP vision encoder); {how_to_get(vit)}")
    resolved = plan.resolve_here(p)
    summary: dict = {"recipe": "llava", "device": resolved["device"]}
    if p.llava.pretrained_pth:  # a wrong file is one line in a second, before any tokenizing or training
        llava.check_pretrained_pth(Path(p.llava.pretrained_pth), llm, vit)
    with output_dir(out) as tmp:
        ctx = llava_context(p, resolved, "pretrain", out)
        start = time.time()
        summary["samples"] = llava.tokenize(VALIDATED_LLAVA, llm, p.train.prompt_template, ctx["max_length"],
                                            tmp / "llava_text")
        summary["tokenize_s"] = round(time.time() - start, 2)
        summary["mean_tokens"] = llava.mean_sample_tokens(tmp / "llava_text", ctx["image_tokens"])  # for tokens/s
        if p.llava.pretrained_pth:
            source = Path(p.llava.pretrained_pth)
            summary["projector_from"] = str(source)
        else:
            source = pretrain_projector(p, ctx, tmp)
            summary["projector_from"] = "pretrain"
            summary["pretrain_iters"] = p.llava.pretrain.max_iters
        weights = llava.check_pretrained_pth(source, llm, vit)
        torch.save({"state_dict": weights}, tmp / "projector.pth")
        summary["projector_keys"] = sorted(weights)
        write_json(tmp / "summary.json", summary)
    return summary


def pretrain_projector(p: P.Params, ctx: dict, tmp: Path) -> Path:
    """XTuner's LLaVA pretrain phase. The config is rendered twice: the one trained from reads the
    tokenized text where it is now (in the stage's temporary output folder), the one kept names its
    final place."""
    import shutil

    from stages.plan import render_text
    from stages.recipes.llava.config import TEMPLATE
    from stages.io import write_text
    from stages.xtuner_api import final_checkpoint, load_config, run_trainer, save_adapter

    config = tmp / "pretrain_config.py"
    write_text(config, render_text(TEMPLATE, {**ctx, "text_folder": str(tmp / "llava_text")}))
    load_config(config)
    shutil.rmtree(PRETRAIN_WORK, ignore_errors=True)  # never resumed: the phase is short
    PRETRAIN_WORK.mkdir(parents=True)
    start = time.time()
    run_trainer(config, PRETRAIN_WORK, None, None)
    ckpt = final_checkpoint(PRETRAIN_WORK)
    pth = PRETRAIN_WORK / "pretrain_weights.pth"
    n = save_adapter(ckpt, pth)
    write_text(config, render_text(TEMPLATE, ctx))
    print(f"[pretrain] projector: {n:,} weights trained in {time.time() - start:.0f} s ({ckpt.name})", flush=True)
    return pth
