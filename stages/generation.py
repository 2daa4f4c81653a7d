"""Generation shared by the evaluate stage and the recipes: greedy chat with transformers, LMDeploy in
an interpreter of its own, and the image recipes' answer scores."""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

from stages import params as P
from stages.errors import fail, verbose


class TransformersChat:
    """Greedy chat generation with transformers, batched with left padding: the prompt is the tokenizer's
    chat template, or XTuner's `template` (train.prompt_template) where the tokenizer has none."""

    def __init__(self, path: Path, device: str, system: str, template: str = "internlm2_chat") -> None:
        from stages.modeldir import load_model, load_tokenizer

        import torch
        import transformers

        if not verbose():  # the remote code's deprecation notices on every generate: not the user's to act on
            transformers.logging.set_verbosity_error()

        key = str(path)
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

    def generate(self, prompts: list[str], max_new_tokens: int, seed: int,
                 warm_up: bool = True) -> tuple[list[str], int, float]:
        """Answers, tokens generated (up to each answer's stop), seconds generating after a warm-up
        (`warm_up=False`: none, for a caller that generates again and again on the same model)."""
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
            if warm_up:
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

    def perplexity(self, conversations: list[list[dict]], batch: int | None = None) -> float:
        """Token-weighted perplexity of whole chat-formatted conversations, `batch` at a time (right
        padding, padded positions neither attended to nor scored); default 8 on a GPU, where one
        forward of 8 costs about what one of 1 does, and 1 on the CPU, where padding is paid in full."""
        return self.perplexities(conversations, 1, batch)[0]

    def perplexities(self, conversations: list[list[dict]], copies: int, batch: int | None = None) -> list[float]:
        """perplexity's figure `copies` times over: each forward holds `batch` conversations `copies` times, one
        block of rows after another (stages/recipes/assistant/select.py Adapters gives each block its own
        checkpoint's adapter); one figure per block."""
        import torch

        batch = batch or (8 if self.device == "cuda" else 1)
        seqs = [self.tok.apply_chat_template(m) if getattr(self.tok, "chat_template", None) else
                self.tok("\n".join(x["content"] for x in m))["input_ids"] for m in conversations]
        nll, count = torch.zeros(copies, dtype=torch.float64), 0
        with torch.no_grad():
            for at in range(0, len(seqs), batch):
                part = seqs[at:at + batch]
                width = max(map(len, part))
                ids = torch.tensor([x + [self.tok.pad_token_id] * (width - len(x)) for x in part] * copies,
                                   device=self.device)
                mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in part] * copies, device=self.device)
                logits = self.model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
                labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
                rows = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100,
                                                         reduction="none").sum(1)
                nll += rows.view(copies, len(part)).sum(1).double().cpu()
                count += int((labels[:len(part)] != -100).sum())
        return [round(math.exp(v / count), 3) for v in nll.tolist()]


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
