"""Stage `pretrain`: the llava recipe's tokenized text and the projector the fine-tune starts from.

For `recipe: llava`:
  1. data/validated/llava.json tokenized once, as XTuner's LLaVADataset would (stages/llava.py), to
     models/pretrain/llava_text/; both phases' configs read it (`offline_processed_text_folder`).
  2. The projector: from `llava.pretrained_pth` when given (checked against the LLM and the vision
     encoder first: XTuner loads it with strict=False and would ignore a wrong file silently), else
     trained here with XTuner's LLaVA pretrain phase (LLM and vision encoder frozen, `llava.pretrain`),
     from models/pretrain/pretrain_config.py rendered with the llava template. Either way its weights go
     to models/pretrain/projector.pth, the fine-tune's `pretrained_pth`.
For any other recipe it has nothing to do and writes models/pretrain/note.json saying so.

The file at `llava.pretrained_pth` is read when the stage runs; DVC reruns the stage when the param
changes, not when the file at the same path is replaced (`dvc repro -f pretrain` then).

    python -m stages.pretrain        # writes models/pretrain/
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Sequence

from stages import params as P
from stages.paths import PRETRAIN, PRETRAIN_WORK, VALIDATED_LLAVA


def prepare(p: P.Params, out: Path) -> dict:
    """Everything of the stage for the llava recipe, into `out` (whole or not at all)."""
    import torch

    from stages import llava, render
    from stages.io import output_dir, write_json
    from stages.modeldir import check

    llm, vit = Path(p.model.path), Path(p.llava.visual_encoder)
    check(llm, "model.path")
    if not (vit / "config.json").is_file():
        from stages.errors import fail

        how = "build it with `dvc repro vision`" if vit.name == "tiny-clip" else "download the CLIP there first"
        fail(f"llava.visual_encoder: {vit} has no config.json; {how}")
    resolved = render.resolve_here(p)
    summary: dict = {"recipe": "llava", "device": resolved["device"]}
    if p.llava.pretrained_pth:  # a wrong file is one line in a second, before any tokenizing or training
        llava.check_pretrained_pth(Path(p.llava.pretrained_pth), llm, vit)
    with output_dir(out) as tmp:
        ctx = render.llava_context(p, resolved, "pretrain", out)
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

    from stages import render
    from stages.io import write_text
    from stages.train import final_checkpoint, save_adapter
    from stages.xtuner_api import load_config, run_trainer

    config = tmp / "pretrain_config.py"
    write_text(config, render.render_text("llava", {**ctx, "text_folder": str(tmp / "llava_text")}))
    load_config(config)
    shutil.rmtree(PRETRAIN_WORK, ignore_errors=True)  # never resumed: the phase is short
    PRETRAIN_WORK.mkdir(parents=True)
    start = time.time()
    run_trainer(config, PRETRAIN_WORK, None, None)
    ckpt = final_checkpoint(PRETRAIN_WORK)
    pth = PRETRAIN_WORK / "pretrain_weights.pth"
    n = save_adapter(ckpt, pth)
    write_text(config, render.render_text("llava", ctx))
    print(f"[pretrain] projector: {n:,} weights trained in {time.time() - start:.0f} s ({ckpt.name})", flush=True)
    return pth


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.pretrain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default=str(P.PARAMS), help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    from stages.train import ensure_hash_seed

    ensure_hash_seed(argv, "stages.pretrain")
    params = P.load(args.params)
    from stages.llava import note

    if params.recipe != "llava":
        from stages.io import output_dir

        with output_dir(PRETRAIN) as tmp:
            note(tmp / "note.json", params.recipe, "nothing to do: only the llava recipe has a pretrain phase")
        print(f"[pretrain] {PRETRAIN}/note.json: nothing to do for recipe {params.recipe}", flush=True)
        return
    P.log_section("pretrain", params.llava)
    s = prepare(params, PRETRAIN)
    print(f"[pretrain] {PRETRAIN}: {s['samples']} tokenized samples, projector from {s['projector_from']} "
          f"({len(s['projector_keys'])} tensors, checked against {params.model.path} + "
          f"{params.llava.visual_encoder})", flush=True)


if __name__ == "__main__":
    from stages.errors import run

    run(main, stage="pretrain")
