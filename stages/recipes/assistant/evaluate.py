"""Stage evaluate, recipe assistant: the base and the merged model answer the same prompts (trained,
held-out paraphrases, general) through their chat template, greedy; identity hit rates, the general
identity leak, perplexity of held-out general conversations, answer length and tokens/s."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from stages import params as P
from stages.errors import fail
from stages.generation import TransformersChat, lmdeploy_answers, lmdeploy_configured, pick_backend
from stages.io import read_json, read_jsonl
from stages.paths import MERGED, llm_dir
from stages.quiet import progress_bar


def run(p: P.Params) -> tuple[list[dict], dict, str]:
    """(rows, metrics, the line to print)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = pick_backend(p.eval.backend, device == "cuda", lmdeploy_configured())
    if backend == "transformers":  # the merged model and the base, unquantized: no 4-bit layer, no image
        from stages.xtuner_api import lean_imports

        lean_imports(images=False)
    rows, metrics = evaluate(p, backend, device)
    b, t = metrics["base"], metrics["tuned"]
    return rows, metrics, (
        f"{backend}, {len(rows)} prompts: identity hit rate trained {b['identity_hit_rate_trained']} "
        f"-> {t['identity_hit_rate_trained']}, held-out {b['identity_hit_rate_heldout']} -> "
        f"{t['identity_hit_rate_heldout']}, general leak {b['general_identity_leak']} -> "
        f"{t['general_identity_leak']}, perplexity {b['perplexity_general']} -> {t['perplexity_general']}")


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
    bar = progress_bar(len(sides) * len(questions), "[evaluate]", unit="prompt")
    for side, path in sides:
        bar.set_postfix_str(side, refresh=False)
        start = time.time()
        chat = TransformersChat(path, device, p.eval.system, p.train.prompt_template)
        if side in served:
            out = served[side]
            answers, n_tokens, seconds, ready = out["answers"], out["tokens"], out["seconds"], out["start_s"]
        else:
            answers, n_tokens, seconds = chat.generate(questions, p.eval.max_new_tokens, p.eval.seed)
            ready = time.time() - start - seconds
        bar.update(len(questions))
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
    bar.close()
    return rows, metrics
