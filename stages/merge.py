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
import time
from pathlib import Path
from typing import Sequence

from stages import params as P
from stages.errors import fail, note
from stages.io import output_dir, write_json
from stages.paths import ADAPTER, CONFIG, LLAVA_VISION, MERGED, MERGE_METRICS, llm_dir


def prompt_batch(tokenizer, prompts: list[str], system: str) -> list[list[int]]:
    out = []
    for prompt in prompts:
        messages = ([{"role": "system", "content": system}] if system else []) + \
            [{"role": "user", "content": prompt}]
        if getattr(tokenizer, "chat_template", None):
            out.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        else:
            out.append(tokenizer(prompt)["input_ids"])
    return out


def merge(base: Path, adapter: Path, out: Path, dtype: str, tolerance: float, prompts: list[str],
          system: str) -> dict:
    begin = time.time()
    from stages.modeldir import copy_remote_code, load_model, load_tokenizer
    from stages.xtuner_api import patch_stack

    patch_stack()
    import torch
    from peft import PeftModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer(base)
    inputs = prompt_batch(tokenizer, prompts, system)
    start = time.time()
    # Straight onto the device (no float32 copy of the whole model in host memory first).
    model = load_model(base, None, torch_dtype=torch.float32, device_map=device)
    loaded = time.time()
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False).eval()
    except Exception as err:  # safetensors, peft and torch each raise their own kinds
        fail(f"{adapter}: the adapter does not load onto {base} ({type(err).__name__}: "
             f"{str(err).splitlines()[0] if str(err) else ''})")
    with torch.no_grad():
        reference = [peft_model(torch.tensor([ids], device=device)).logits.float().cpu() for ids in inputs]
    merged = peft_model.merge_and_unload().eval()
    with torch.no_grad():
        diff = max((merged(torch.tensor([ids], device=device)).logits.float().cpu() - ref).abs().max().item()
                   for ids, ref in zip(inputs, reference))
    if diff > tolerance:
        fail(f"assistant.merge_tolerance: merged model's logits differ from base+adapter by {diff:.3g} "
             f"> {tolerance:g}; the merge is wrong (adapter does not fit {base}?)")
    merged = merged.to(getattr(torch, dtype))
    merged.config.torch_dtype = getattr(torch, dtype)
    checked = time.time()
    with output_dir(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        copy_remote_code(base, tmp)
    end = time.time()
    return {"max_logit_diff": diff, "tolerance": tolerance, "dtype": dtype, "prompts": len(inputs),
            "merge_time_s": round(end - start, 2), "import_s": round(start - begin, 2), "load_s": round(loaded - start, 2),
            "merge_and_check_s": round(checked - loaded, 2), "save_s": round(end - checked, 2)}


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


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.merge", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default=str(P.PARAMS), help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    from stages.xtuner_api import lean_imports

    params = P.load(args.params)
    lean_imports(images=params.recipe != "assistant")
    if params.recipe == "internvl":  # stages/recipes/internvl/steps.py
        from stages.recipes.internvl import steps as internvl_recipe

        metrics = internvl_recipe.run_merge(params)
        write_json(MERGE_METRICS, metrics)
        print(f"[merge] {MERGED}: convert_to_official ({metrics['dtype']}) + remote code "
              f"{', '.join(metrics['remote_code_copied']) or '(none)'}; trained vs converted max |logit diff| "
              f"{metrics['max_logit_diff']:.2e} (tolerance {metrics['tolerance']:g}; "
              f"{metrics['max_logit_diff_unrounded']:.2e} before rounding to {metrics['dtype']})", flush=True)
        kept, trained = metrics["max_logit_change_from_base"], metrics["trained_max_logit_change_from_base"]
        if trained and kept < trained / 2:
            print(f"[merge] warning: in {metrics['dtype']} the converted model moved {kept:.3g} from the base model "
                  f"where the trained one moved {trained:.3g}: most of this run's update is below the weights' "
                  "rounding step (a short run, or a small learning rate)", flush=True)
        return
    if params.recipe == "llava":
        metrics = merge_llava(params, ADAPTER, MERGED)
        write_json(MERGE_METRICS, metrics)
        print(f"[merge] {MERGED}: llm/, visual_encoder/, projector/; base+adapters vs merged max |logit diff| "
              f"{metrics['max_logit_diff']:.2e} (tolerance {metrics['tolerance']:g}: XTuner saves the LLM in "
              "float16)", flush=True)
        return
    P.log_section("merge", params.assistant)
    dtype = params.assistant.merge_dtype
    if dtype == "auto":
        from stages.xtuner_api import read_pipeline

        dtype = read_pipeline(CONFIG)["torch_dtype"]
    if not (ADAPTER / "adapter_config.json").is_file():
        fail(f"{ADAPTER}: no adapter; run `dvc repro convert` first")
    metrics = merge(llm_dir(params.recipe), ADAPTER, MERGED, dtype, params.assistant.merge_tolerance,
                    list(params.assistant.prompts), params.eval.system)
    note(**{k: v for k, v in metrics.items() if k.endswith("_s")})
    write_json(MERGE_METRICS, metrics)
    print(f"[merge] {MERGED}: {dtype}; base+adapter vs merged max |logit diff| {metrics['max_logit_diff']:.2e} "
          f"(tolerance {metrics['tolerance']:g})", flush=True)


if __name__ == "__main__":
    from stages.errors import run

    run(main, stage="merge")
