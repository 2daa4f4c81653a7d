"""Stage select, recipe assistant: the checkpoints' adapters on one loaded base model, several at a time, asked the
evaluate stage's prompts and scored as evaluate scores (stages/select.py says the rule)."""
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
    found = {step: memo.get(step, memo.key(path)) for step, path in states}
    missing = [(step, path) for step, path in states if found[step] is None]
    bar = progress_bar(len(states), "[select]", unit="checkpoint")
    bar.update(len(states) - len(missing))
    for at in range(0, len(missing), GROUP):  # the checkpoints no valid entry was kept for, GROUP at a time
        group = missing[at:at + GROUP]
        bar.set_postfix_str(", ".join("base model" if path is None else f"iter_{step}" for step, path in group),
                            refresh=False)
        for (step, _), scored in zip(group, memo.score(group, load())):
            found[step] = scored
        bar.update(len(group))
    bar.close()
    for step, _ in states:
        (row, said), kept = found[step]
        beside += kept == "during training"
        earlier += kept == "earlier"
        rows.append(row)
        answers += [{"step": step, **r} for r in said]
    base, checkpoints = rows[0], rows[1:]
    chosen, within = choose(checkpoints, p.select, base["perplexity_general"])
    adopt(next(c for c in ckpts if step_of(c) == chosen["step"]))
    timing = dict.fromkeys(("load_base_s", "swap_adapter_s", "generate_s", "perplexity_s", "groups"), 0.0)
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
    for it, then the checkpoints' adapters (stages/snapshots.py) scored as they are saved, BESIDE_GROUP at a time
    (the base model with the first), into the Memo, until the train stage marks the training done, then what
    is left; a summary line. It stops when the train stage is gone."""
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
    pending: list[tuple[int, Path | None]] = [(0, None)]  # the base model, scored with the first checkpoints
    done: set[str] = set()
    while True:
        finished = TRAINED.exists()  # read before the listing: every snapshot of a finished run is listed below
        for path in sorted(SNAPSHOTS.glob("iter_*.pth"), key=step_of):
            if path.name not in done:
                pending.append((step_of(path), path))
                done.add(path.name)
        while len(pending) >= BESIDE_GROUP or (finished and pending):
            group, pending = pending[:BESIDE_GROUP], pending[BESIDE_GROUP:]
            memo.score(group, scorer)
        if finished:
            break
        wait()
    t = scorer.timing
    return (f"{len(done)} checkpoints and the base model scored beside the trainer, in {t['groups']} groups "
            f"(loading {t['load_base_s']:.1f} s, answers {t['generate_s']:.1f} s, perplexity {t['perplexity_s']:.1f} s)")


def lean() -> None:
    """The scorer's base model is loaded unquantized (stages/generation.py TransformersChat), with no image:
    neither bitsandbytes, DeepSpeed nor torchvision is imported (as evaluate's transformers backend; a
    DeepSpeed checkpoint folder is still read, stages/xtuner_api.py load_checkpoint_weights)."""
    from stages.xtuner_api import lean_imports

    lean_imports(images=False)


# How many checkpoints are scored in one pass (their answers decoded in one batch): the base weights are read
# once a decoding step for all of them. Beside the trainer the scorer scores BESIDE_GROUP at a time: two processes on
# one GPU take turns, and the trainer loses about as much per decoding step whatever the step's rows (a third to
# an eighth of the loss per answer token at 3 and 9 checkpoints a step, benchmarks/gpu_sharing.py).
GROUP = 9
BESIDE_GROUP = 3


class Scorer:
    """The base model loaded once, unchanged; a group of checkpoints scored in one pass: each of evaluate's
    prompts asked once per checkpoint in one batch, every row with its own checkpoint's adapter applied beside
    the shared base weights (Adapters), and scored as evaluate scores."""

    def __init__(self, p: P.Params, pipeline: dict) -> None:
        import torch

        from stages.generation import TransformersChat

        self.p = p
        self.prompts = load_prompts(p)
        self.conversations = [r["messages"] for r in read_jsonl(Path(p.assistant.perplexity_data),
                                                                "assistant.perplexity_data")]
        start = time.time()
        self.chat = TransformersChat(llm_dir(p.recipe), "cuda" if torch.cuda.is_available() else "cpu",
                                     p.eval.system, p.train.prompt_template)
        self.adapters = Adapters(self.chat.model, pipeline["lora_targets"], p.lora.alpha)
        self.timing = {"load_base_s": time.time() - start, "swap_adapter_s": 0.0, "generate_s": 0.0,
                       "perplexity_s": 0.0, "groups": 0}

    def score(self, group: list[tuple[int, dict | None]]) -> list[tuple[dict, list[dict]]]:
        """[(the step's scores, its answers)] for `group`: [(step, a checkpoint's adapter weights, None for the
        base model)]."""
        p, n = self.p, len(group)
        t0 = time.time()
        self.adapters.set([(w, CHECKPOINTS / f"iter_{step}.pth") for step, w in group])
        try:
            t1 = time.time()
            said, _, _ = self.chat.generate([q for _, q in self.prompts] * n, p.eval.max_new_tokens, p.eval.seed,
                                            warm_up=False)  # checkpoint after checkpoint, as Adapters reads the rows
            t2 = time.time()
            ppl = self.chat.perplexities(self.conversations, copies=n)
        finally:
            self.adapters.set([])
        self.timing["swap_adapter_s"] += t1 - t0
        self.timing["generate_s"] += t2 - t1
        self.timing["perplexity_s"] += time.time() - t2
        self.timing["groups"] += 1
        out, k = [], len(self.prompts)
        for i, (step, _) in enumerate(group):
            scored = [{"prompt": q, "kind": kind, "answer": a}
                      for (kind, q), a in zip(self.prompts, said[i * k:(i + 1) * k])]
            out.append(({"step": step, **score(scored, "answer", p.data.assistant.name, p.data.assistant.author),
                         "perplexity_general": ppl[i]}, scored))
        return out


class Adapters:
    """Several checkpoints' LoRA adapters on one base model at once, one per block of rows: a forward hook on
    every adapted linear adds `alpha / r * (x @ A.T) @ B.T`, with the A and B of the checkpoint whose rows these
    are (the batch holds the checkpoints' rows one checkpoint after another, the same number each; the base
    model's rows get nothing). Computed in the adapter weights' dtype, as peft computes its LoRA branch; the
    base weights are never changed. On one H200 (1.8B, 31 prompts) the LoRA branch made a decoding step 40 ms
    against 26 ms with the adapter merged into the weights, for one checkpoint (benchmarks/select_decode.py);
    here the step serves several."""

    def __init__(self, model, targets: list[str], alpha: float) -> None:
        import torch

        self.alpha, targets = alpha, set(targets)
        self.layers = {name: m for name, m in model.named_modules()
                       if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets}
        self.stacks: dict[str, tuple] = {}
        for name, module in self.layers.items():
            module.register_forward_hook(self._hook(name))

    def _hook(self, name: str):
        import torch

        def add_lora(module, args, out):
            stack = self.stacks.get(name)
            if stack is None:
                return out
            a, b, scale = stack  # (checkpoints, r, in), (checkpoints, out, r)
            x = args[0].reshape(a.shape[0], -1, a.shape[2]).to(a.dtype)
            return out + (torch.bmm(torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2)) * scale).reshape(
                out.shape).to(out.dtype)

        return add_lora

    def set(self, adapters: list[tuple[dict | None, Path]]) -> None:
        """[(a checkpoint's adapter weights under peft's names, or None: the base model; its file, for errors)];
        []: none (the plain base model)."""
        import torch

        self.stacks = {}
        if all(w is None for w, _ in adapters):
            return
        for weights, where in adapters:
            if weights is None:
                continue
            names = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in weights if ".lora_" in k}
            missing, unknown = sorted(set(self.layers) - names), sorted(names - set(self.layers))
            if missing or unknown or len(weights) != 2 * len(names):
                fail(f"{where}: not an adapter of this model and lora settings ({len(missing)} adapted layers "
                     f"missing, {len(unknown)} unknown, e.g. {(missing + unknown + [''])[0]}); rerun "
                     "`dvc repro train`")
        some = next(w for w, _ in adapters if w is not None)
        for name, module in self.layers.items():
            stacked = []
            for part in ("lora_A", "lora_B"):
                key = f"base_model.model.{name}.{part}.default.weight"
                zero = torch.zeros_like(some[key])  # the base model's rows: no adapter
                stacked.append(torch.stack([zero if w is None else w[key] for w, _ in adapters]).to(module.weight.device))
            self.stacks[name] = (*stacked, self.alpha / stacked[0].shape[1])


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

    def score(self, group: list[tuple[int, Path | None]], scorer: Scorer) -> list[tuple[tuple[dict, list[dict]], None]]:
        """`group` ([(step, checkpoint or None: the base model)]) scored by `scorer` in one pass, each kept under
        its key; [((scores, answers), None)]."""
        keys = [self.key(path) for _, path in group]
        scored = scorer.score([(step, None if path is None else checkpoint_weights(path)) for step, path in group])
        for (step, _), key, (row, answers) in zip(group, keys, scored):
            self.put(step, key, row, answers)
        return [(s, None) for s in scored]


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
