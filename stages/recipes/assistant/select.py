"""Stage select, recipe assistant: each checkpoint's adapter on one loaded base model, asked the evaluate
stage's prompts and scored as evaluate scores (stages/select.py says the rule)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from stages import params as P
from stages.checkpoints import adopt, saved, step_of
from stages.errors import fail
from stages.io import read_jsonl, write_json
from stages.paths import ADAPTER_PTH, CHECKPOINTS, SCORED, SNAPSHOTS, TRAINED, llm_dir
from stages.quiet import progress_bar
from stages.recipes.assistant.evaluate import load_prompts, score

METRICS = ("identity_hit_rate_trained", "identity_hit_rate_heldout", "general_identity_leak", "perplexity_general")


def run(p: P.Params, pipeline: dict) -> tuple[dict, list[dict], list[dict], str]:
    lean()
    ckpts = saved()
    start = time.time()
    memo = Memo(p, pipeline)
    scorer = None  # loaded when a checkpoint was not scored during training (stages/select.py)

    def load() -> Scorer:
        nonlocal scorer
        scorer = scorer or Scorer(p, pipeline)
        return scorer

    rows, answers, beside, earlier = [], [], 0, 0
    memo.digest(ckpts)
    states = [(0, None)] + [(step_of(c), c) for c in ckpts]
    bar = progress_bar(len(states), "[select]", unit="checkpoint")
    for step, path in states:
        bar.set_postfix_str("base model" if path is None else f"iter_{step}", refresh=False)
        (row, said), kept = memo.scored(step, path, load)
        beside += kept == "during training"
        earlier += kept == "earlier"
        rows.append(row)
        answers += [{"step": step, **r} for r in said]
        bar.update(1)
    bar.close()
    base, checkpoints = rows[0], rows[1:]
    chosen, within = choose(checkpoints, p.select, base["perplexity_general"])
    adopt(next(c for c in ckpts if step_of(c) == chosen["step"]))
    timing = dict.fromkeys(("load_base_s", "swap_adapter_s", "generate_s", "perplexity_s"), 0.0)
    if scorer is not None:
        timing = scorer.timing
    choice = {"rule": p.select.rule, "chosen_step": chosen["step"], "last_step": checkpoints[-1]["step"],
              "scored": True, "within_limits": within, "max_leak": p.select.max_leak,
              "max_perplexity_rise": p.select.max_perplexity_rise, "base": base,
              **{k: chosen[k] for k in METRICS}, "checkpoints": len(checkpoints),
              "scored_during_training": beside, "kept_from_an_earlier_select": earlier,
              "seconds": round(time.time() - start, 1), "timing": {k: round(v, 2) for k, v in timing.items()}}
    during = "".join(f" ({n} of {len(states)} {said})" for n, said in (
        (beside, "scored during training"), (earlier, "kept from an earlier select run")) if n)
    line = (f"{len(checkpoints)} checkpoints scored in {choice['seconds']} s{during}; rule {p.select.rule}: "
            f"iter_{chosen['step']} into {ADAPTER_PTH} (held-out identity {chosen['identity_hit_rate_heldout']}, "
            f"general leak {chosen['general_identity_leak']}, perplexity {chosen['perplexity_general']})"
            + ("" if within else "; no checkpoint was within the limits"))
    return choice, rows, answers, line


def follow(p: P.Params, pipeline: dict) -> str:
    """Beside the trainer (the train stage starts `python -m stages.select --during-training`): once the first
    checkpoint is saved (the trainer's memory has settled by then), the base model loaded when the GPU has room
    for it, then each checkpoint's adapter (stages/snapshots.py) scored as it is saved, into the Memo, until
    the train stage marks the training done; a summary line. It stops when the train stage is gone."""
    lean()
    import torch

    parent = os.getppid()

    def wait() -> None:  # the train stage gone (killed): so is this
        if os.getppid() != parent:
            raise SystemExit(1)
        time.sleep(0.5)

    memo = Memo(p, pipeline, during_training=True)
    while not any(SNAPSHOTS.glob("iter_*.pth")) and not TRAINED.exists():
        wait()
    if torch.cuda.is_available():
        need = 1.25 * sum(f.stat().st_size for f in llm_dir(p.recipe).resolve().rglob("*.safetensors")) + 2e9
        free = torch.cuda.mem_get_info()[0]
        if free < need:
            return (f"{free / 1e9:.1f} GB free on the GPU beside the trainer, {need / 1e9:.1f} GB needed: "
                    "the select stage scores the checkpoints after training")
    scorer = Scorer(p, pipeline)
    memo.scored(0, None, lambda: scorer)
    done: set[str] = set()
    while True:
        finished = TRAINED.exists()  # read before the listing: every snapshot of a finished run is listed below
        for path in sorted(SNAPSHOTS.glob("iter_*.pth"), key=step_of):
            if path.name in done:
                continue
            memo.scored(step_of(path), path, lambda: scorer)
            done.add(path.name)
        if finished:
            break
        wait()
    t = scorer.timing
    return (f"{len(done)} checkpoints and the base model scored beside the trainer (loading {t['load_base_s']:.1f} s, "
            f"answers {t['generate_s']:.1f} s, perplexity {t['perplexity_s']:.1f} s)")


def lean() -> None:
    """The scorer's base model is loaded unquantized (stages/generation.py TransformersChat), with no image:
    neither bitsandbytes, DeepSpeed nor torchvision is imported (as evaluate's transformers backend; a
    DeepSpeed checkpoint folder is still read, stages/xtuner_api.py load_checkpoint_weights)."""
    from stages.xtuner_api import lean_imports

    lean_imports(images=False)


class Scorer:
    """The base model loaded once, each checkpoint's adapter merged into it in turn (MergedWeights), asked the
    evaluate stage's prompts and scored as evaluate scores the merged model."""

    def __init__(self, p: P.Params, pipeline: dict) -> None:
        import torch

        self.p = p
        self.prompts = load_prompts(p)
        self.conversations = [r["messages"] for r in read_jsonl(Path(p.assistant.perplexity_data),
                                                                "assistant.perplexity_data")]
        start = time.time()
        self.chat, self.model = adapter_chat(p, pipeline, "cuda" if torch.cuda.is_available() else "cpu")
        self.merged = MergedWeights(self.model)
        self.timing = {"load_base_s": time.time() - start, "swap_adapter_s": 0.0, "generate_s": 0.0,
                       "perplexity_s": 0.0}

    def score(self, step: int, weights: dict | None) -> tuple[dict, list[dict]]:
        """(the step's scores, its answers); `weights`: a checkpoint's adapter weights, None for the base model."""
        p = self.p
        with self.model.disable_adapter():  # the adapter merged into the weights: a plain model's decoding steps
            t0 = time.time()
            if weights is not None:
                load_adapter(self.model, weights, CHECKPOINTS / f"iter_{step}.pth")
            self.merged.set(weights is not None)
            t1 = time.time()
            said, _, _ = self.chat.generate([q for _, q in self.prompts], p.eval.max_new_tokens, p.eval.seed,
                                            warm_up=False)
            t2 = time.time()
            ppl = self.chat.perplexity(self.conversations)
            self.timing["swap_adapter_s"] += t1 - t0
            self.timing["generate_s"] += t2 - t1
            self.timing["perplexity_s"] += time.time() - t2
        scored = [{"prompt": q, "kind": kind, "answer": a} for (kind, q), a in zip(self.prompts, said)]
        row = {"step": step, **score(scored, "answer", p.data.assistant.name, p.data.assistant.author),
               "perplexity_general": ppl}
        return row, scored


class Memo:
    """Scores kept in the train stage's work dir (models/work/scores/iter_N.json, base.json), written by the
    scorer that runs beside the trainer (`select.during_training`) and read back by this stage. An entry is
    used only under the key it was written with: a digest of the checkpoint file and of
    everything else the score depends on (the scoring code, the prompts, the held-out conversations, the
    eval, lora and data params it reads, the base model's files, the device the config was rendered for), so a stale entry is
    never used: its checkpoint is scored again."""

    def __init__(self, p: P.Params, pipeline: dict, during_training: bool = False) -> None:
        import hashlib

        from stages import generation
        from stages.recipes.assistant import evaluate

        h = hashlib.sha256()
        for path in (Path(__file__), Path(evaluate.__file__), Path(generation.__file__),
                     Path(p.assistant.heldout_prompts), Path(p.assistant.perplexity_data)):
            h.update(path.read_bytes())
        model = llm_dir(p.recipe).resolve()
        files = sorted(f for f in model.rglob("*") if f.is_file())
        h.update(json.dumps({
            "eval": [p.eval.system, p.eval.max_new_tokens, p.eval.seed], "template": p.train.prompt_template,
            "prompts": list(p.assistant.prompts), "identity": [p.data.assistant.name, p.data.assistant.author],
            "lora": [p.lora.r, p.lora.alpha, sorted(pipeline["lora_targets"])],
            "device": pipeline["device"],
            "model": [[str(f.relative_to(model)), f.stat().st_size, f.stat().st_mtime_ns] for f in files],
        }, ensure_ascii=False, sort_keys=True).encode())
        self.settings = h.hexdigest()
        self.keys: dict[Path, str] = {}
        self.during_training = during_training  # who writes the entries: the scorer beside the trainer, or select

    def digest(self, checkpoints: list[Path]) -> None:
        """The keys of `checkpoints`, read and digested side by side (hashlib and file reads release the GIL:
        eight 250 MB adapters of the 1.8B model take a core's second each)."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
            self.keys.update(zip(checkpoints, pool.map(self.key, checkpoints)))

    def key(self, checkpoint: Path | None) -> str:
        """The settings' digest with the checkpoint file's bytes (the snapshot the scorer read and the file in
        models/checkpoints/ are the same bytes); None: the base model."""
        import hashlib

        if checkpoint in self.keys:
            return self.keys[checkpoint]
        h = hashlib.sha256(self.settings.encode())
        if checkpoint is not None:
            with open(checkpoint, "rb") as f:
                while chunk := f.read(1 << 24):
                    h.update(chunk)
        return h.hexdigest()

    @staticmethod
    def path(step: int) -> Path:
        return SCORED / ("base.json" if step == 0 else f"iter_{step}.json")

    def get(self, step: int, key: str) -> tuple[tuple[dict, list[dict]], str] | None:
        """The valid entry's (scores, answers) and who wrote it ("during training" or "earlier"), or None."""
        try:
            entry = json.loads(self.path(step).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if entry.get("key") != key:
            return None
        return (entry["row"], entry["answers"]), "during training" if entry.get("during_training") else "earlier"

    def put(self, step: int, key: str, row: dict, answers: list[dict]) -> None:
        write_json(self.path(step), {"key": key, "row": row, "answers": answers,
                                     "during_training": self.during_training}, indent=None)

    def scored(self, step: int, checkpoint: Path | None, scorer) -> tuple[tuple[dict, list[dict]], str | None]:
        """((scores, answers), who scored them: "during training", "earlier" (a select run before), None: now) of
        `checkpoint` (None: the base model): the valid entry, else `scorer()`'s, kept."""
        key = self.key(checkpoint)
        found = self.get(step, key)
        if found is not None:
            return found
        scored = scorer().score(step, None if checkpoint is None else checkpoint_weights(checkpoint))
        self.put(step, key, *scored)
        return scored, None


def checkpoint_weights(path: Path) -> dict:
    """A checkpoint's adapter weights under peft's names (XTuner's carry an `llm.` prefix)."""
    from stages.xtuner_api import load_checkpoint_weights

    return {k.removeprefix("llm."): v for k, v in load_checkpoint_weights(path).items()}


def choose(rows: list[dict], select: P.Select, base_perplexity: float) -> tuple[dict, bool]:
    """The rule's checkpoint and whether it is within the limits; pure."""
    if select.rule == "last":
        return rows[-1], True
    ok = [r for r in rows if r["general_identity_leak"] <= select.max_leak
          and r["perplexity_general"] <= base_perplexity * (1 + select.max_perplexity_rise)]
    if ok:
        return max(ok, key=lambda r: (r["identity_hit_rate_heldout"], r["identity_hit_rate_trained"],
                                      -r["general_identity_leak"], -r["step"])), True
    return max(rows, key=lambda r: (r["identity_hit_rate_heldout"] - r["general_identity_leak"], -r["step"])), False


def adapter_chat(p: P.Params, pipeline: dict, device: str):
    """The base model loaded once for chat, with an empty LoRA adapter of the trained shape on it."""
    from stages.xtuner_api import patch_stack

    patch_stack()  # before peft imports transformers' models (torchvision's ops on a CPU torch)
    from peft import LoraConfig, get_peft_model

    from stages.generation import TransformersChat

    chat = TransformersChat(llm_dir(p.recipe), device, p.eval.system, p.train.prompt_template)
    config = LoraConfig(r=p.lora.r, lora_alpha=p.lora.alpha, lora_dropout=0.0, bias="none",
                        target_modules=list(pipeline["lora_targets"]), task_type="CAUSAL_LM")
    chat.model = get_peft_model(chat.model, config).eval()
    return chat, chat.model


class MergedWeights:
    """Each checkpoint scored as the merged model it would become: its adapter added into the base weights of
    the layers it adapts (as peft's merge, which the merge stage runs), the LoRA branch bypassed, so that
    every decoding step runs the plain model's kernels, not LoRA's extra products besides (on one H200, 1.8B:
    40 -> 26 ms a decoding step for 31 prompts, benchmarks/select_decode.py); the base weights kept apart
    and put back before the next checkpoint, so nothing accumulates."""

    def __init__(self, model) -> None:
        import torch
        from peft.tuners.lora import LoraLayer

        self.layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        weights = [m.get_base_layer().weight for m in self.layers]
        size = sum(w.numel() * w.element_size() for w in weights)
        # on the GPU when twice their size is free there (copying back from the host took 0.36 s a
        # checkpoint for 1.8B), else in host memory
        here = weights and weights[0].is_cuda and torch.cuda.mem_get_info(weights[0].device)[0] > 2 * size
        self.base = [w.detach().clone() if here else w.detach().to("cpu", copy=True) for w in weights]

    def set(self, adapted: bool) -> None:
        """The base weights, plus the loaded adapter's when `adapted`."""
        import torch

        with torch.no_grad():
            for layer, base in zip(self.layers, self.base):
                weight = layer.get_base_layer().weight
                weight.copy_(base)
                if adapted:
                    weight += layer.get_delta_weight("default")


def load_adapter(model, weights: dict, where: Path) -> None:
    """A checkpoint's adapter weights (checkpoint_weights) into the peft model."""
    own = model.state_dict()
    missing = [k for k in own if "lora_" in k and k not in weights]
    unknown = [k for k in weights if k not in own]
    if missing or unknown:
        fail(f"{where}: not an adapter of this model and lora settings ({len(missing)} LoRA weights missing, "
             f"{len(unknown)} unknown, e.g. {(missing + unknown)[0]}); rerun `dvc repro train`")
    model.load_state_dict(weights, strict=False)
