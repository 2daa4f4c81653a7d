"""Stage select, recipe assistant: each checkpoint's adapter on one loaded base model, asked the evaluate
stage's prompts and scored as evaluate scores (stages/select.py says the rule)."""
from __future__ import annotations

import time
from pathlib import Path

from stages import params as P
from stages.checkpoints import adopt, saved, step_of
from stages.errors import fail
from stages.io import read_jsonl
from stages.paths import ADAPTER_PTH, SELECT, llm_dir
from stages.quiet import progress_bar
from stages.recipes.assistant.evaluate import load_prompts, score

METRICS = ("identity_hit_rate_trained", "identity_hit_rate_heldout", "general_identity_leak", "perplexity_general")


def run(p: P.Params, pipeline: dict) -> tuple[dict, list[dict], list[dict], str]:
    import torch

    ckpts = saved()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    prompts = load_prompts(p)
    conversations = [r["messages"] for r in read_jsonl(Path(p.assistant.perplexity_data), "assistant.perplexity_data")]
    start = time.time()
    chat, model = adapter_chat(p, pipeline, device)
    merged = MergedWeights(model)
    timing = {"load_base_s": time.time() - start, "swap_adapter_s": 0.0, "generate_s": 0.0, "perplexity_s": 0.0}
    rows, answers = [], []
    states = [(0, None)] + [(step_of(c), c) for c in ckpts]
    bar = progress_bar(len(states), "[select]", unit="checkpoint")
    for step, weights in states:
        bar.set_postfix_str("base model" if weights is None else f"iter_{step}", refresh=False)
        with model.disable_adapter():  # the adapter merged into the weights: a plain model's decoding steps
            t0 = time.time()
            if weights is not None:
                load_adapter(model, weights)
            merged.set(weights is not None)
            t1 = time.time()
            said, _, _ = chat.generate([q for _, q in prompts], p.eval.max_new_tokens, p.eval.seed, warm_up=False)
            t2 = time.time()
            ppl = chat.perplexity(conversations)
            timing["swap_adapter_s"] += t1 - t0
            timing["generate_s"] += t2 - t1
            timing["perplexity_s"] += time.time() - t2
        scored = [{"prompt": q, "kind": kind, "answer": a} for (kind, q), a in zip(prompts, said)]
        row = {"step": step, **score(scored, "answer", p.data.assistant.name, p.data.assistant.author),
               "perplexity_general": ppl}
        rows.append(row)
        answers += [{"step": step, **r} for r in scored]
        bar.update(1)
    bar.close()
    base, checkpoints = rows[0], rows[1:]
    chosen, within = choose(checkpoints, p.select, base["perplexity_general"])
    adopt(next(c for c in ckpts if step_of(c) == chosen["step"]))
    plot_curves(rows, chosen["step"], p.select)
    choice = {"rule": p.select.rule, "chosen_step": chosen["step"], "last_step": checkpoints[-1]["step"],
              "scored": True, "within_limits": within, "max_leak": p.select.max_leak,
              "max_perplexity_rise": p.select.max_perplexity_rise, "base": base,
              **{k: chosen[k] for k in METRICS}, "checkpoints": len(checkpoints),
              "seconds": round(time.time() - start, 1), "timing": {k: round(v, 2) for k, v in timing.items()}}
    line = (f"{len(checkpoints)} checkpoints scored in {choice['seconds']} s; rule {p.select.rule}: "
            f"iter_{chosen['step']} into {ADAPTER_PTH} (held-out identity {chosen['identity_hit_rate_heldout']}, "
            f"general leak {chosen['general_identity_leak']}, perplexity {chosen['perplexity_general']})"
            + ("" if within else "; no checkpoint was within the limits"))
    return choice, rows, answers, line


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


def load_adapter(model, path: Path) -> None:
    """A checkpoint's adapter weights (XTuner's names: `llm.` + peft's) into the peft model."""
    from stages.xtuner_api import load_checkpoint_weights

    weights = {k.removeprefix("llm."): v for k, v in load_checkpoint_weights(path).items()}
    own = model.state_dict()
    missing = [k for k in own if "lora_" in k and k not in weights]
    unknown = [k for k in weights if k not in own]
    if missing or unknown:
        fail(f"{path}: not an adapter of this model and lora settings ({len(missing)} LoRA weights missing, "
             f"{len(unknown)} unknown, e.g. {(missing + unknown)[0]}); rerun `dvc repro train`")
    model.load_state_dict(weights, strict=False)


def plot_curves(rows: list[dict], chosen: int, select: P.Select) -> None:
    """reports/select/curves.png: the four scores over the step (0: the base model), the choice marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key, label in (("identity_hit_rate_trained", "identity, trained questions"),
                       ("identity_hit_rate_heldout", "identity, held-out questions"),
                       ("general_identity_leak", "general answers naming it")):
        left.plot(steps, [r[key] for r in rows], marker="o", label=label)
    left.axhline(select.max_leak, color="grey", linestyle=":", linewidth=1)
    right.plot(steps, [r["perplexity_general"] for r in rows], marker="o", color="tab:red")
    right.axhline(rows[0]["perplexity_general"] * (1 + select.max_perplexity_rise), color="grey", linestyle=":",
                  linewidth=1)
    for ax, title in ((left, "share of answers"), (right, "perplexity, held-out general chats")):
        ax.axvline(chosen, color="black", linewidth=1)
        ax.set_xlabel("step (0: base model)")
        ax.set_title(title, fontsize=10)
    left.legend(fontsize=8)
    fig.tight_layout()
    SELECT.mkdir(parents=True, exist_ok=True)
    fig.savefig(SELECT / "curves.png", dpi=110)
    plt.close(fig)
