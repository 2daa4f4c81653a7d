"""Stage `evaluate`: ask the base and the fine-tuned model the same prompts, and measure the change.

Three kinds of prompt, each through the model's chat template with the same greedy decoding:
`trained` (the tutorial's, also in the training data), `heldout` (paraphrases never trained on) and
`general` (nothing to do with identity). Measured for both models:

  identity hit rate      share of answers naming both the assistant and its author (trained, heldout)
  general identity leak  share of general answers that name the assistant or author anyway: the
                         tutorial's fine-tune ended up answering everything with its identity sentence
  perplexity             of held-out general conversations (forgetting shows as a rise)
  answer length, tokens/s

Outputs: reports/eval/generations.jsonl (prompt, kind, base, tuned) and reports/eval/metrics.json.

Recipe llava, as the tutorial asks about a test image before and after fine-tuning: each of
`llava.eval_images` with `llava.eval_prompt` (or the image's own first question in the data), asked of
the model before fine-tuning (the LLM, the vision encoder and the pretrained projector) and of the
merged fine-tune, greedy. Measured for both: the share of answers equal to the data's answer for that
image, their mean similarity to it (difflib ratio), answer length and tokens/s. Rows (kind `image`)
also hold the image and the reference answer.

Recipe internvl, as the tutorial asks InternVL2-2B about a picture: each of `internvl.eval_images` with
`internvl.eval_prompt` ("请你根据这张图片，讲一个脑洞大开的梗"), asked of `internvl.path` and of the converted
fine-tune, greedy, through the model's own chat() (transformers), or on a GPU host through LMDeploy with
the `internvl2-internlm2` chat template (eval.backend; stages/recipes/internvl/steps.py). Measured as for llava,
against each image's caption in the data.

    python -m stages.evaluate
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Sequence

from stages import params as P
from stages.errors import fail
from stages.io import read_json, read_jsonl, write_json, write_jsonl
from stages.generation import (TransformersChat, lmdeploy_answers, lmdeploy_configured, pick_backend,
                               score_image_answers)
from stages.paths import EVAL_METRICS, GENERATIONS, LLAVA_VISION, MERGED, llm_dir


def load_prompts(p: P.Params) -> list[tuple[str, str]]:
    """(kind, prompt) pairs: the training-time prompts, the held-out paraphrases, general prompts."""
    path = Path(p.assistant.heldout_prompts)
    extra = read_json(path, "assistant.heldout_prompts")
    if not isinstance(extra, dict):
        fail(f"{path}: expected an object with lists 'identity_heldout' and 'general'")
    out = [("trained", q) for q in p.assistant.prompts]
    for key, kind in (("identity_heldout", "heldout"), ("general", "general")):
        items = extra.get(key)
        if not isinstance(items, list) or not items or not all(isinstance(s, str) and s.strip() for s in items):
            fail(f"{path}: {key}: expected a non-empty list of non-empty strings")
        out += [(kind, q) for q in items]
    return out


def names_identity(answer: str, name: str, author: str) -> bool:
    low = answer.lower()
    return name.lower() in low and author.lower() in low


def mentions_identity(answer: str, name: str, author: str) -> bool:
    low = answer.lower()
    return name.lower() in low or author.lower() in low


def score(rows: list[dict], side: str, name: str, author: str) -> dict:
    """The identity metrics of one model's answers (`side`: base or tuned); pure."""
    def rate(kind, test):
        answers = [r[side] for r in rows if r["kind"] == kind]
        return round(sum(test(a, name, author) for a in answers) / len(answers), 4) if answers else None

    return {"identity_hit_rate_trained": rate("trained", names_identity),
            "identity_hit_rate_heldout": rate("heldout", names_identity),
            "general_identity_leak": rate("general", mentions_identity)}


def evaluate(p: P.Params, backend: str, device: str) -> tuple[list[dict], dict]:
    prompts = load_prompts(p)
    conversations = [r["messages"] for r in read_jsonl(Path(p.assistant.perplexity_data), "assistant.perplexity_data")]
    questions = [q for _, q in prompts]
    rows = [{"prompt": q, "kind": kind} for kind, q in prompts]
    metrics: dict[str, Any] = {"backend": backend, "prompts": len(prompts)}
    sides = (("base", llm_dir(p.recipe)), ("tuned", MERGED))
    served = dict(zip(("base", "tuned"), lmdeploy_answers([path for _, path in sides], questions, p))) \
        if backend == "lmdeploy" else {}  # first, alone on the GPU; perplexity below is transformers'
    for side, path in sides:
        start = time.time()
        chat = TransformersChat(path, device, p.eval.system, p.train.prompt_template)
        if side in served:
            out = served[side]
            answers, n_tokens, seconds, ready = out["answers"], out["tokens"], out["seconds"], out["start_s"]
        else:
            answers, n_tokens, seconds = chat.generate(questions, p.eval.max_new_tokens, p.eval.seed)
            ready = time.time() - start - seconds
        for row, answer in zip(rows, answers):
            row[side] = answer
        metrics[side] = {
            **score(rows, side, p.data.assistant.name, p.data.assistant.author),
            "perplexity_general": chat.perplexity(conversations),
            "mean_answer_tokens": round(n_tokens / len(answers), 1),
            "generation_tokens_per_sec": round(n_tokens / seconds, 1) if seconds else None,
            "start_s": round(ready, 2),
        }
        del chat
    return rows, metrics


def evaluate_llava(p: P.Params) -> tuple[list[dict], dict]:
    """Image prompts before and after fine-tuning (see the module docstring)."""
    import torch

    from stages.recipes.llava import model as llava
    from stages.paths import ADAPTER_PTH

    folder = Path(p.data.llava.image_folder)
    known = llava.first_questions(read_json(Path(p.data.llava.source), "data.llava.source"))
    rows = []
    for image in p.llava.eval_images:
        if not (folder / image).is_file():
            fail(f"llava.eval_images: {image}: not found in data.llava.image_folder ({folder})")
        question, reference = known.get(image, (None, None))
        prompt = p.llava.eval_prompt or question
        if prompt is None:
            fail(f"llava.eval_images: {image} is not in {p.data.llava.source}; set llava.eval_prompt to ask about it")
        rows.append({"prompt": prompt, "kind": "image", "image": str(folder / image),
                     "reference": reference if prompt == question else None})
    projector = torch.load(ADAPTER_PTH, map_location="cpu", weights_only=True)["projector_before"]
    models = {"base": lambda: llava.Chat.load(llm_dir(p.recipe), LLAVA_VISION, projector,
                                              template=p.train.prompt_template),
              "tuned": lambda: llava.Chat.load(MERGED / "llm", MERGED / "visual_encoder", MERGED / "projector",
                                               template=p.train.prompt_template)}
    metrics: dict[str, Any] = {"backend": "transformers", "prompts": len(rows)}
    for side, load in models.items():
        chat = load()
        chat.answer(Path(rows[0]["image"]), rows[0]["prompt"], 2, p.eval.system)  # warm-up, untimed
        torch.manual_seed(p.eval.seed)
        n_tokens, start = 0, time.time()
        for row in rows:
            row[side], n = chat.answer(Path(row["image"]), row["prompt"], p.eval.max_new_tokens, p.eval.system)
            n_tokens += n
        seconds = time.time() - start
        metrics[side] = score_image_answers(rows, side, n_tokens, seconds)
        del chat
    return rows, metrics


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default=str(P.PARAMS), help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    params = P.load(args.params)
    P.log_section("evaluate", params.eval)
    import torch

    if params.recipe == "internvl":
        from stages.recipes.internvl import steps as internvl_recipe

        backend = pick_backend(params.eval.backend, torch.cuda.is_available(), lmdeploy_configured())
        rows, metrics = internvl_recipe.evaluate(params, backend)
        write_jsonl(GENERATIONS, rows)
        write_json(EVAL_METRICS, metrics)
        b, t = metrics["base"], metrics["tuned"]
        print(f"[evaluate] {backend}, {len(rows)} images asked {params.internvl.eval_prompt!r}: captions matched "
              f"{b['answer_match_rate']} -> {t['answer_match_rate']}, similarity {b['answer_similarity']} -> "
              f"{t['answer_similarity']}", flush=True)
        return
    if params.recipe == "llava":
        rows, metrics = evaluate_llava(params)
        write_jsonl(GENERATIONS, rows)
        write_json(EVAL_METRICS, metrics)
        b, t = metrics["base"], metrics["tuned"]
        print(f"[evaluate] {len(rows)} image prompts: answers matching the data {b['answer_match_rate']} -> "
              f"{t['answer_match_rate']}, similarity {b['answer_similarity']} -> {t['answer_similarity']}",
              flush=True)
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = pick_backend(params.eval.backend, device == "cuda", lmdeploy_configured())
    rows, metrics = evaluate(params, backend, device)
    write_jsonl(GENERATIONS, rows)
    write_json(EVAL_METRICS, metrics)
    b, t = metrics["base"], metrics["tuned"]
    print(f"[evaluate] {backend}, {len(rows)} prompts: identity hit rate trained {b['identity_hit_rate_trained']} "
          f"-> {t['identity_hit_rate_trained']}, held-out {b['identity_hit_rate_heldout']} -> "
          f"{t['identity_hit_rate_heldout']}, general leak {b['general_identity_leak']} -> "
          f"{t['general_identity_leak']}, perplexity {b['perplexity_general']} -> {t['perplexity_general']}",
          flush=True)


if __name__ == "__main__":
    from stages.errors import run

    run(main, stage="evaluate")
