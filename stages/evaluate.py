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
the `internvl2-internlm2` chat template (eval.backend; stages/internvl_recipe.py). Measured as for llava,
against each image's caption in the data.

    python -m stages.evaluate
"""
from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

from stages import params as P
from stages.errors import fail
from stages.io import read_json, read_jsonl, write_json, write_jsonl
from stages.paths import EVAL_METRICS, GENERATIONS, MERGED


def load_prompts(p: P.Params) -> list[tuple[str, str]]:
    """(kind, prompt) pairs: the training-time prompts, the held-out paraphrases, general prompts."""
    path = Path(p.eval.heldout_prompts)
    extra = read_json(path, "eval.heldout_prompts")
    if not isinstance(extra, dict):
        fail(f"{path}: expected an object with lists 'identity_heldout' and 'general'")
    out = [("trained", q) for q in p.eval.prompts]
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


class TransformersChat:
    """Greedy chat generation with transformers, batched with left padding: the prompt is the tokenizer's
    chat template, or XTuner's `template` (train.prompt_template) where the tokenizer has none."""

    def __init__(self, path: Path, device: str, system: str, template: str = "internlm2_chat") -> None:
        from stages.modeldir import load_model, load_tokenizer

        import torch

        key = "model.path" if path != MERGED else str(MERGED)
        self.tok = load_tokenizer(path, key)
        self.tok.padding_side = "left"
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        self.model = load_model(path, key, torch_dtype=dtype).to(device).eval()
        self.device, self.system, self.template = device, system, template

    def encode(self, messages: list[dict]) -> list[int]:
        if self.system:
            messages = [{"role": "system", "content": self.system}] + messages
        if getattr(self.tok, "chat_template", None):
            return self.tok.apply_chat_template(messages, add_generation_prompt=True)
        from stages.xtuner_api import prompt_template

        t = prompt_template(self.template)
        text = "".join(t["INSTRUCTION"].format(input=m["content"], round=1) for m in messages if m["role"] == "user")
        if self.system and t.get("SYSTEM"):
            text = t["SYSTEM"].format(system=self.system) + text
        return self.tok(text)["input_ids"]

    def generate(self, prompts: list[str], max_new_tokens: int, seed: int) -> tuple[list[str], int, float]:
        """Answers, tokens generated (up to each answer's stop), seconds generating after a warm-up."""
        import torch

        torch.manual_seed(seed)
        ids = [self.encode([{"role": "user", "content": q}]) for q in prompts]
        width = max(map(len, ids))  # left padding, so every answer starts at the same column
        batch = {"input_ids": torch.tensor([[self.tok.pad_token_id] * (width - len(x)) + x for x in ids]),
                 "attention_mask": torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])}
        batch = {k: v.to(self.device) for k, v in batch.items()}
        stop = [i for i in {self.tok.eos_token_id, self.tok.convert_tokens_to_ids("<|im_end|>")}
                if isinstance(i, int) and i != self.tok.unk_token_id]
        with torch.no_grad():
            self.model.generate(**{k: v[:1] for k, v in batch.items()}, max_new_tokens=2, do_sample=False,
                                pad_token_id=self.tok.pad_token_id)  # warm-up, untimed (as LMDeploy's)
            start = time.time()
            out = self.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop,
                                      pad_token_id=self.tok.pad_token_id)
        seconds = time.time() - start
        new = out[:, batch["input_ids"].shape[1]:]
        answers, n_tokens = [], 0
        for row in new.tolist():
            kept = []
            for t in row:
                if t in stop:
                    break
                kept.append(t)
            n_tokens += len(kept)
            answers.append(self.tok.decode(kept, skip_special_tokens=True).strip())
        return answers, n_tokens, seconds

    def perplexity(self, conversations: list[list[dict]]) -> float:
        """Token-weighted perplexity of whole chat-formatted conversations."""
        import torch

        nll, count = 0.0, 0
        with torch.no_grad():
            for messages in conversations:
                ids = self.tok.apply_chat_template(messages) if getattr(self.tok, "chat_template", None) else \
                    self.tok("\n".join(m["content"] for m in messages))["input_ids"]
                x = torch.tensor([ids], device=self.device)
                loss = self.model(input_ids=x, labels=x).loss.item()
                nll += loss * (len(ids) - 1)
                count += len(ids) - 1
        return round(math.exp(nll / count), 3)


def score_image_answers(rows: list[dict], side: str, n_tokens: int, seconds: float) -> dict:
    """The image recipes' figures for one side (base or tuned): answers equal to the data's, their mean
    similarity to it (difflib ratio), answer length and tokens/s."""
    import difflib

    scored = [r for r in rows if r["reference"]]
    return {
        "answer_match_rate": round(sum(r[side] == r["reference"] for r in scored) / len(scored), 4)
        if scored else None,
        "answer_similarity": round(sum(difflib.SequenceMatcher(None, r[side], r["reference"]).ratio()
                                       for r in scored) / len(scored), 4) if scored else None,
        "mean_answer_tokens": round(n_tokens / len(rows), 1),
        "generation_tokens_per_sec": round(n_tokens / seconds, 1) if seconds else None,
    }


def pick_backend(requested: str, cuda: bool, lmdeploy_python: bool = False) -> str:
    """auto: LMDeploy where a GPU is visible and an LMDeploy interpreter is configured."""
    if requested != "auto":
        return requested
    return "lmdeploy" if cuda and lmdeploy_python else "transformers"


# LMDeploy, in an interpreter of its own: each model in turn, one warm-up generation, then the prompts
# timed (tokens/s after start-up, as transformers' figure is); the engine's start-up is reported apart
LMDEPLOY_SCRIPT = """
import json, sys, time
from lmdeploy import ChatTemplateConfig, GenerationConfig, PytorchEngineConfig, pipeline
req = json.load(sys.stdin)
gen = GenerationConfig(max_new_tokens=req["max_new_tokens"], do_sample=False, random_seed=req["seed"])
results = []
for model in req["models"]:
    start = time.time()
    pipe = pipeline(model, backend_config=PytorchEngineConfig(), chat_template_config=ChatTemplateConfig(**req["template"]))
    pipe(req["prompts"][:1], gen_config=GenerationConfig(max_new_tokens=4, do_sample=False))
    ready = time.time()
    out = pipe(req["prompts"], gen_config=gen)
    results.append({"answers": [o.text.strip() for o in out], "tokens": sum(o.generate_token_len for o in out),
                    "seconds": time.time() - ready, "start_s": ready - start})
    pipe.close()
json.dump(results, sys.stdout)
"""


def lmdeploy_template(system: str) -> dict:
    """XTuner's internlm2_chat template (the tutorial's) spelled out for LMDeploy's ChatTemplateConfig:
    recent LMDeploy releases dropped their built-in `internlm2` template, and a name they do not know
    falls back to plain text. The same prompt as the tokenizer's chat template, system block included
    only when eval.system is set."""
    return {"model_name": "internlm2", "system": "<|im_start|>system\n" if system else "",
            "meta_instruction": system, "eosys": "<|im_end|>\n" if system else "", "user": "<|im_start|>user\n",
            "eoh": "<|im_end|>\n", "assistant": "<|im_start|>assistant\n", "eoa": "<|im_end|>", "separator": "\n",
            "stop_words": ["<|im_end|>"]}


def run_lmdeploy(script: str, request: dict) -> Any:
    """`script` in $LMDEPLOY_PYTHON with `request` as JSON on stdin; its last line of output, parsed.

    LMDeploy cannot share XTuner 0.2.0's environment (every release that runs on a current torch wants
    transformers >= 4.56; XTuner pins 4.48), so it runs in its own interpreter
    (benchmarks/lmdeploy_env.sh builds one for a GPU host)."""
    import json
    import subprocess

    python = os.environ.get("LMDEPLOY_PYTHON")
    if not python:
        fail("eval.backend: lmdeploy needs its own environment: set LMDEPLOY_PYTHON to a Python that has "
             "lmdeploy (see README.md), or use eval.backend: transformers")
    try:
        proc = subprocess.run([python, "-c", script], input=json.dumps(request), capture_output=True, text=True)
    except OSError as err:
        fail(f"eval.backend: lmdeploy: LMDEPLOY_PYTHON={python} cannot run ({err.strerror})")
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        fail(f"eval.backend: lmdeploy failed in {python} ({last})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def lmdeploy_answers(paths: list[Path], prompts: list[str], p: P.Params) -> list[dict]:
    """LMDeploy's pipeline() with InternLM2's chat template, as the tutorial chats with the result: for
    each model, its answers, tokens generated, seconds generating and seconds starting the engine."""
    return run_lmdeploy(LMDEPLOY_SCRIPT, {"models": [str(path) for path in paths], "prompts": prompts,
                                          "template": lmdeploy_template(p.eval.system),
                                          "max_new_tokens": p.eval.max_new_tokens, "seed": p.eval.seed})


def lmdeploy_configured() -> bool:
    return bool(os.environ.get("LMDEPLOY_PYTHON"))


def evaluate(p: P.Params, backend: str, device: str) -> tuple[list[dict], dict]:
    prompts = load_prompts(p)
    conversations = [r["messages"] for r in read_jsonl(Path(p.eval.perplexity_data), "eval.perplexity_data")]
    questions = [q for _, q in prompts]
    rows = [{"prompt": q, "kind": kind} for kind, q in prompts]
    metrics: dict[str, Any] = {"backend": backend, "prompts": len(prompts)}
    sides = (("base", Path(p.model.path)), ("tuned", MERGED))
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
            **score(rows, side, p.data.assistant_name, p.data.author),
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

    from stages import llava
    from stages.paths import PRETRAIN

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
    projector = torch.load(PRETRAIN / "projector.pth", map_location="cpu", weights_only=True)["state_dict"]
    models = {"base": lambda: llava.Chat.load(Path(p.model.path), Path(p.llava.visual_encoder), projector,
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
        from stages import internvl_recipe

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
