"""What the internvl recipe's convert, merge and evaluate stages share.

- `save_adapter`: the trained weights (the LLM's LoRA and mlp1) checked and saved as safetensors. XTuner's
  pth_to_hf has no InternVL path (InternVL_V1_5 has no `to_hf`); its one converter is
  convert_to_official, which the merge stage runs.
- `merge`: XTuner's convert_to_official (rebuilds the model from the rendered config without
  quantization, loads the checkpoint, merges LoRA, saves bfloat16 with the tokenizer), then the model's
  remote-code files copied in (the tool does not), then checked: it loads with trust_remote_code, and on
  the evaluation images its logits agree with the trained model's (XTuner's InternVL_V1_5 with the
  checkpoint, LoRA unmerged, float32) within `internvl.merge_tolerance`.
- `Chat`: the image prompt answered through the model's own `chat()` (transformers), the image tiled
  and normalised as XTuner's InternVL dataset does; `lmdeploy_answers` for GPU hosts.

Every XTuner import happens after `xtuner_api.patch_stack()`.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from stages.errors import fail, settle

LMDEPLOY_TEMPLATE = "internvl2-internlm2"  # the chat template the tutorial's lmdeploy pipeline uses for InternVL2-2B
# its system prompt; recent LMDeploy releases dropped the built-in template, so it is spelled out
INTERNVL2_SYSTEM = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"


# ---------------------------------------------------------------------------------------------
# convert


def save_adapter(pth: Path, out: Path, lora: dict) -> dict:
    """The checkpoint's weights (LoRA of `model.language_model`, `model.mlp1`) as out/adapter.safetensors,
    with out/adapter_config.json; a checkpoint of another recipe is one line (XTuner's converter loads
    it with strict=False and would ignore it silently)."""
    from safetensors.torch import save_file

    from stages.io import output_dir, write_json
    from stages.xtuner_api import load_checkpoint_weights

    if not pth.is_file():
        fail(f"{pth}: not found; run `dvc repro train` first")
    weights = load_checkpoint_weights(pth)
    lora_keys = sorted(k for k in weights if k.startswith("model.language_model.") and "lora_" in k)
    mlp1 = sorted(k for k in weights if k.startswith("model.mlp1."))
    other = sorted(set(weights) - set(lora_keys) - set(mlp1))
    if other or not lora_keys:
        fail(f"{pth}: not an InternVL QLoRA checkpoint ({len(lora_keys)} LoRA keys of model.language_model, "
             f"{len(other)} others such as {', '.join(other[:2])})")
    with output_dir(out) as tmp:
        save_file({k: weights[k].contiguous() for k in lora_keys + mlp1}, str(tmp / "adapter.safetensors"))
        write_json(tmp / "adapter_config.json", {
            "format": "XTuner InternVL_V1_5 state_dict (load with strict=False after building the model)",
            **lora, "lora_tensors": len(lora_keys), "mlp1_tensors": len(mlp1),
            "parameters": sum(weights[k].numel() for k in lora_keys + mlp1)})
    return {"lora_tensors": len(lora_keys), "mlp1_tensors": len(mlp1)}


# ---------------------------------------------------------------------------------------------
# images and chat


def tiles(image: Path, model_config: Any) -> Any:
    """An image as XTuner's InternVL dataset feeds it: dynamic tiles (+ thumbnail), resized, normalised."""
    from stages.xtuner_api import patch_stack

    patch_stack()
    import torch
    import torchvision.transforms as T
    from PIL import Image
    from torchvision.transforms.functional import InterpolationMode
    from xtuner.dataset.internvl_dataset import dynamic_preprocess

    from stages.recipes.internvl.model import IMAGENET_MEAN, IMAGENET_STD

    size = model_config.force_image_size
    transform = T.Compose([T.Resize((size, size), interpolation=InterpolationMode.BICUBIC), T.ToTensor(),
                           T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)])
    with Image.open(image) as img:
        parts = dynamic_preprocess(img.convert("RGB"), model_config.min_dynamic_patch, model_config.max_dynamic_patch,
                                   size, model_config.use_thumbnail)
    return torch.stack([transform(p) for p in parts])


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class Chat:
    """An InternVL model directory loaded with its remote code, float32, eval mode, on the GPU where
    there is one."""

    def __init__(self, path: Path, key: str) -> None:
        from stages.modeldir import check, load_tokenizer
        from stages.xtuner_api import patch_stack

        patch_stack()
        import torch
        from transformers import AutoModel

        check(path, key)
        settle()  # before the model (stages/errors.py)
        try:
            self.model = AutoModel.from_pretrained(str(path), trust_remote_code=True, local_files_only=True,
                                                   torch_dtype=torch.float32).to(device()).eval()
        except Exception as err:  # a missing modeling file, damaged weights: each raises its own kind
            fail(f"{key}: {path} does not load as an InternVL model with its remote code "
                 f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})")
        self.tokenizer = load_tokenizer(path, key)

    def answer(self, image: Path, prompt: str, max_new_tokens: int) -> tuple[str, int]:
        """Greedy answer through the model's chat(), and its token count."""
        import torch

        with torch.no_grad():
            text = self.model.chat(self.tokenizer, tiles(image, self.model.config).to(self.model.device), prompt,
                                   dict(max_new_tokens=max_new_tokens, do_sample=False))
        return text, len(self.tokenizer.encode(text, add_special_tokens=False))

    def logits(self, image: Path, prompt: str) -> Any:
        return logits_of(self.model, self.tokenizer, image, prompt)


def logits_of(model: Any, tokenizer: Any, image: Path, prompt: str) -> Any:
    """The LLM's logits over the chat prompt with the image, through the model's own forward()."""
    import torch

    pixels = tiles(image, model.config)
    model.img_context_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    text = prompt_text(model, prompt, pixels.shape[0])
    ids = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        out = model(pixel_values=pixels.to(model.device), input_ids=ids["input_ids"].to(model.device),
                    attention_mask=ids["attention_mask"].to(model.device),
                    image_flags=torch.ones(pixels.shape[0], 1, dtype=torch.long, device=model.device))
    return out.logits.float().cpu()


def prompt_text(model: Any, prompt: str, num_patches: int) -> str:
    """The model's chat prompt with the image's context tokens: its own `prompt()` where it has one (the
    stand-in), else InternLM2's format with `<img>` + `<IMG_CONTEXT>` x tokens + `</img>`."""
    if hasattr(model, "prompt"):
        return model.prompt(prompt, num_patches)
    image = "<img>" + "<IMG_CONTEXT>" * model.num_image_token * num_patches + "</img>"
    return f"<|im_start|>user\n{image}\n{prompt}<|im_end|><|im_start|>assistant\n"


# ---------------------------------------------------------------------------------------------
# merge


def trained_model(config: Path, pth: Path) -> Any:
    """XTuner's InternVL_V1_5 from the rendered config, unquantized, float32, the checkpoint loaded
    (LoRA unmerged); fails when a checkpoint key finds no place (XTuner's strict=False would not)."""
    from stages.xtuner_api import load_checkpoint_weights, load_config, patch_internvl

    patch_internvl("float32")
    import torch
    from xtuner.registry import BUILDER

    cfg = load_config(config)
    cfg.model.quantization_llm = False
    cfg.model.quantization_vit = False
    model = BUILDER.build(cfg.model)
    result = model.load_state_dict(load_checkpoint_weights(pth), strict=False)
    if result.unexpected_keys:
        fail(f"{pth}: {len(result.unexpected_keys)} weights find no place in the model built from {config} "
             f"(such as {result.unexpected_keys[0]})")
    return model.model.to(torch.float32).to(device()).eval()


def rounded_merge(trained: Any, dtype: str) -> Any:
    """The trained model as a correct conversion saves it: LoRA merged in float32, every weight rounded
    to the saved dtype (and computed in float32 again)."""
    import torch

    lm = trained.language_model
    if hasattr(lm, "merge_and_unload"):
        trained.language_model = lm.merge_and_unload()
    saved = getattr(torch, dtype)
    for param in trained.parameters():
        param.data = param.data.to(saved).to(torch.float32)
    return trained


def merge(config: Path, pth: Path, model_dir: Path, out: Path, torch_dtype: str, images: list[Path], prompt: str,
          tolerance: float) -> dict:
    """convert_to_official into `out` (whole or not at all), the remote code copied, then the checks.

    The converted model's logits are compared with the trained model's (XTuner's model from the rendered
    config, the checkpoint loaded, LoRA unmerged, float32) twice: as trained, which shows what saving in
    the converted dtype costs, and merged in float32 and rounded to that dtype, which is what a correct
    conversion writes; the second is checked against `internvl.merge_tolerance`. In bfloat16 a short
    run's update can be smaller than the weights' rounding step (InternVL2-2B's shape after 4 steps at
    lr 4e-5: the first figure 0.88, the training's own effect 0.08)."""
    from stages.io import output_dir
    from stages.modeldir import copy_remote_code
    from stages.xtuner_api import convert_to_official

    start = time.time()
    with output_dir(out) as tmp:
        convert_to_official(config, pth, tmp, torch_dtype)
        copied = copy_remote_code(model_dir, tmp)  # convert_to_official does not: no modeling_internvl_chat.py
        seconds = time.time() - start
        merged = Chat(tmp, str(out))
        saved_dtype = json.loads((tmp / "config.json").read_text()).get("torch_dtype")
        base = Chat(model_dir, str(model_dir))
        logits = {image: merged.logits(image, prompt) for image in images}
        before = {image: base.logits(image, prompt) for image in images}
        trained = trained_model(config, pth)
        as_trained = {image: logits_of(trained, base.tokenizer, image, prompt) for image in images}
        rounded = rounded_merge(trained, saved_dtype or "float32")

        def largest(a: dict, b: dict) -> float:
            return max((a[i] - b[i]).abs().max().item() for i in images)

        exact = largest(logits, as_trained)
        diff = largest(logits, {i: logits_of(rounded, base.tokenizer, i, prompt) for i in images})
        change, trained_change = largest(logits, before), largest(as_trained, before)
        if diff > tolerance:
            fail(f"internvl.merge_tolerance: the converted model's logits differ from the trained model's "
                 f"(merged, {saved_dtype}) by {diff:.3g} > {tolerance:g}; the conversion is wrong")
        if change == 0.0:
            fail(f"{pth}: the converted model answers exactly as {model_dir} does: no trained weight reached it")
    return {"max_logit_diff": diff, "tolerance": tolerance, "max_logit_diff_unrounded": round(exact, 4),
            "max_logit_change_from_base": round(change, 4), "trained_max_logit_change_from_base": round(trained_change, 4),
            "dtype": str(saved_dtype), "remote_code_copied": copied,
            "prompts": len(images), "merge_time_s": round(seconds, 2)}


# ---------------------------------------------------------------------------------------------
# lmdeploy


LMDEPLOY_SCRIPT = """
import json, sys, time
from lmdeploy import ChatTemplateConfig, GenerationConfig, pipeline
from lmdeploy.vl import load_image
req = json.load(sys.stdin)
pipe = pipeline(req["model"], chat_template_config=ChatTemplateConfig(**req["template"]))
gen = GenerationConfig(max_new_tokens=req["max_new_tokens"], do_sample=False, random_seed=req["seed"])
images = [load_image(path) for path in req["images"]]
pipe([(req["prompt"], images[0])], gen_config=GenerationConfig(max_new_tokens=2, do_sample=False))
start = time.time()
out = pipe([(req["prompt"], image) for image in images], gen_config=gen)
json.dump({"answers": [o.text.strip() for o in out], "tokens": [o.generate_token_len for o in out],
           "seconds": time.time() - start}, sys.stdout)
"""


def lmdeploy_answers(model: Path, images: list[Path], prompt: str, max_new_tokens: int, seed: int) -> dict:
    """The tutorial's `pipeline(model)((prompt, load_image(image)))` with the internvl2-internlm2 chat
    template, in LMDeploy's own interpreter ($LMDEPLOY_PYTHON: it cannot share XTuner 0.2.0's
    environment)."""
    from stages.generation import lmdeploy_template, run_lmdeploy

    template = {**lmdeploy_template(INTERNVL2_SYSTEM), "model_name": LMDEPLOY_TEMPLATE}
    return run_lmdeploy(LMDEPLOY_SCRIPT, {"model": str(model), "images": [str(i) for i in images], "prompt": prompt,
                                          "template": template, "max_new_tokens": max_new_tokens, "seed": seed})


# ---------------------------------------------------------------------------------------------
# the stages' recipe branches


def run_merge(p: Any) -> dict:
    """The merge stage for recipe internvl: models/merged from models/adapter.pth."""
    from stages.paths import ADAPTER, ADAPTER_PTH, CONFIG, INTERNVL_MODEL, MERGED
    from stages.xtuner_api import read_pipeline

    if not (ADAPTER / "adapter.safetensors").is_file():
        fail(f"{ADAPTER}: no adapter; run `dvc repro convert` first")
    folder = Path(p.data.internvl.image_folder)
    images = [folder / image for image in p.internvl.eval_images]
    for image in images:
        if not image.is_file():
            fail(f"internvl.eval_images: {image.relative_to(folder)}: not found in data.internvl.image_folder ({folder})")
    dtype = read_pipeline(CONFIG)["torch_dtype"]
    return merge(CONFIG, ADAPTER_PTH, INTERNVL_MODEL, MERGED, dtype, images, p.internvl.eval_prompt,
                 p.internvl.merge_tolerance)


def reference_answers(source: Path) -> dict[str, str]:
    """image -> its caption (the first answer) in CLoT-style records."""
    from stages.io import read_json

    out: dict[str, str] = {}
    for r in read_json(source, "data.internvl.source"):
        if "image" in r and r["image"] not in out:
            out[r["image"]] = r["conversations"][1]["value"].strip()
    return out


def evaluate(p: Any, backend: str, tick=lambda answers: None) -> tuple[list[dict], dict]:
    """The image prompt about each of `internvl.eval_images`, asked of `internvl.path` (before fine-tuning)
    and of models/merged (after): answers, and their match and similarity to the data's caption.
    `tick(n)` after every n answers (a progress bar's update)."""
    import torch

    from stages.generation import score_image_answers
    from stages.paths import INTERNVL_MODEL, MERGED

    folder = Path(p.data.internvl.image_folder)
    known = reference_answers(Path(p.data.internvl.source))
    rows = []
    for image in p.internvl.eval_images:
        if not (folder / image).is_file():
            fail(f"internvl.eval_images: {image}: not found in data.internvl.image_folder ({folder})")
        rows.append({"prompt": p.internvl.eval_prompt, "kind": "image", "image": str(folder / image),
                     "reference": known.get(image)})
    metrics: dict[str, Any] = {"backend": backend, "prompts": len(rows),
                               "chat_template": LMDEPLOY_TEMPLATE if backend == "lmdeploy" else "the model's chat()"}
    for side, path, key in (("base", INTERNVL_MODEL, str(INTERNVL_MODEL)), ("tuned", MERGED, str(MERGED))):
        if backend == "lmdeploy":
            out = lmdeploy_answers(path, [Path(r["image"]) for r in rows], p.internvl.eval_prompt,
                                   p.eval.max_new_tokens, p.eval.seed)
            answers, n_tokens, seconds = out["answers"], sum(out["tokens"]), out["seconds"]
            tick(len(answers))
        else:
            chat = Chat(path, key)
            chat.answer(Path(rows[0]["image"]), rows[0]["prompt"], 2)  # warm-up, untimed (as the text recipe's)
            torch.manual_seed(p.eval.seed)
            start = time.time()
            answers, n_tokens = [], 0
            for row in rows:
                text, n = chat.answer(Path(row["image"]), row["prompt"], p.eval.max_new_tokens)
                answers.append(text)
                n_tokens += n
                tick(1)
            seconds = time.time() - start
            del chat
        for row, answer in zip(rows, answers):
            row[side] = answer
        metrics[side] = score_image_answers(rows, side, n_tokens, seconds)
    return rows, metrics
