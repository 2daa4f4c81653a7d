"""Stage merge, recipe llava: XTuner's own merge tool, as the tutorial runs it twice: the LLM with
llm_adapter, the CLIP with visual_encoder_adapter (`--is-clip`); the projector copied beside them
(models/merged/llm/, visual_encoder/, projector/). Checked on the evaluation images: base models + adapters
against the merged parts, both loaded in float32; XTuner saves the merged LLM in float16, so the
tolerance is `llava.merge_tolerance`."""
from __future__ import annotations

import time
from pathlib import Path

from stages import params as P
from stages.errors import fail
from stages.paths import ADAPTER, LLAVA_VISION, MERGED, llm_dir


def run(p: P.Params) -> tuple[dict, list[str]]:
    metrics = merge_llava(p, ADAPTER, MERGED)
    return metrics, [f"{MERGED}: llm/, visual_encoder/, projector/; base+adapters vs merged max |logit diff| "
                     f"{metrics['max_logit_diff']:.2e} (tolerance {metrics['tolerance']:g}: XTuner saves the LLM in "
                     "float16)"]


def merge_llava(p: P.Params, adapter: Path, out: Path) -> dict:
    """XTuner's merge of both parts, then the logits check on every evaluation image."""
    from stages.recipes.llava import model as llava

    for part in ("llm_adapter", "visual_encoder_adapter", "projector"):
        if not (adapter / part).is_dir():
            fail(f"{adapter}/{part}: missing; run `dvc repro convert` first")
    llm, vit = llm_dir(p.recipe), LLAVA_VISION
    start = time.time()
    llava.merge_llava(adapter, llm, vit, out)
    seconds = time.time() - start
    merged = llava.Chat.load(out / "llm", out / "visual_encoder", out / "projector", template=p.train.prompt_template)
    unmerged = llava.Chat.load(llm, vit, adapter / "projector", adapter / "llm_adapter",
                               adapter / "visual_encoder_adapter", template=p.train.prompt_template)
    folder = Path(p.data.llava.image_folder)
    prompt = p.llava.eval_prompt or "请描述这张图片。"
    diff = max((merged.logits(folder / image, prompt) - unmerged.logits(folder / image, prompt)).abs().max().item()
               for image in p.llava.eval_images)
    tolerance = p.llava.merge_tolerance
    if diff > tolerance:
        fail(f"llava.merge_tolerance: merged model's logits differ from base+adapters by {diff:.3g} > "
             f"{tolerance:g}; the merge is wrong (adapters do not fit {llm} + {vit}?)")
    return {"max_logit_diff": diff, "tolerance": tolerance, "dtype": "float16 LLM (XTuner's merge)",
            "prompts": len(p.llava.eval_images), "merge_time_s": round(seconds, 2)}
