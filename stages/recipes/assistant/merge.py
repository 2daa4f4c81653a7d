"""Stage merge, recipe assistant: the adapter merged into the base model with peft, saved as safetensors
in `assistant.merge_dtype`, then checked: on the evaluation prompts, the logits of base+adapter and of
the merged model (float32) agree within `assistant.merge_tolerance`."""
from __future__ import annotations

import time
from pathlib import Path

from stages import params as P
from stages.errors import fail, note
from stages.io import output_dir
from stages.paths import ADAPTER, CONFIG, MERGED, llm_dir


def run(p: P.Params) -> tuple[dict, list[str]]:
    """The merge and its check; (metrics, the lines to print)."""
    P.log_section("merge", p.assistant)
    dtype = p.assistant.merge_dtype
    if dtype == "auto":
        from stages.xtuner_api import read_pipeline

        dtype = read_pipeline(CONFIG)["torch_dtype"]
    if not (ADAPTER / "adapter_config.json").is_file():
        fail(f"{ADAPTER}: no adapter; run `dvc repro convert` first")
    metrics = merge(llm_dir(p.recipe), ADAPTER, MERGED, dtype, p.assistant.merge_tolerance,
                    list(p.assistant.prompts), p.eval.system)
    note(**{k: v for k, v in metrics.items() if k.endswith("_s")})
    return metrics, [f"{MERGED}: {dtype}; base+adapter vs merged max |logit diff| {metrics['max_logit_diff']:.2e} "
                     f"(tolerance {metrics['tolerance']:g})"]


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
