"""Stage `report`: reports/report.md, the page a reviewer reads in a pull request.

The params that matter (with what `auto` became on this machine), data statistics, the loss curve
(reports/loss.png), training and merge figures, the evaluation metrics and every answer of the base
and the tuned model side by side, and the wall time and peak memory of each stage. The headline
numbers also go to reports/metrics.json for `dvc metrics diff`.

Recipe llava: the same page, with the vision encoder and projector in the params, and the image
prompts as a table of thumbnails (the images themselves, referenced relative to reports/) with the
data's answer and the answers before and after fine-tuning side by side.

Recipe internvl: the same, with the tutorial's image prompt, the captions and the conversion check.

    python -m stages.report
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

from stages import params as P
from stages.io import read_json, read_jsonl, write_json, write_text
from stages.paths import (CONFIG, DATA_STATS, EVAL_METRICS, GENERATIONS, LOSS_PNG, MERGE_METRICS, REPORT,
                          REPORTS, STAGE_TIMES, TRAIN_LIVE, INTERNVL_MODEL, LLAVA_VISION, llm_dir)

LOSS_TSV = TRAIN_LIVE / "plots" / "metrics" / "train" / "loss.tsv"
STAGE_ORDER = ["prepare", "validate", "render", "train", "convert", "merge",
               "evaluate"]


def read_tsv(text: str) -> tuple[list[int], list[float]]:
    lines = [line.split("\t") for line in text.splitlines()[1:] if line.strip()]
    return [int(float(a)) for a, _ in lines], [float(b) for _, b in lines]


def plot_losses(curves: dict[str, tuple[list[int], list[float]]], out: Path, title: str) -> None:
    """Loss against step, one line per run, as a PNG (same data, same bytes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    for label, (steps, losses) in curves.items():
        ax.plot(steps, losses, label=label, linewidth=1.4)
    ax.set(xlabel="step", ylabel="training loss", title=title)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, metadata={"Software": None})
    plt.close(fig)


def cell(text: Any, limit: int = 160) -> str:
    """A value fit for one markdown table cell."""
    s = "" if text is None else str(text)
    s = s.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ⏎ ").strip()
    return s if len(s) <= limit else s[: limit - 1] + "…"


def table(header: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    out += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def _training_headline(train: dict, merge: dict) -> dict:
    """What both recipes' headlines share: training and merge."""
    return {
        "final_loss": train.get("final_loss"), "tokens_per_sec": train.get("tokens_per_sec"),
        "peak_memory_mb": train.get("peak_memory_mb"), "train_wall_time_s": train.get("wall_time_s"),
        "merge_max_logit_diff": merge.get("max_logit_diff"),
    }


def headline(train: dict, merge: dict, ev: dict, data: dict) -> dict:
    """The numbers `dvc metrics diff` compares across experiments."""
    t, b = ev.get("tuned", {}), ev.get("base", {})
    return {
        **_training_headline(train, merge),
        "identity_hit_rate_trained": t.get("identity_hit_rate_trained"),
        "identity_hit_rate_heldout": t.get("identity_hit_rate_heldout"),
        "general_identity_leak": t.get("general_identity_leak"),
        "perplexity_general_base": b.get("perplexity_general"),
        "perplexity_general_tuned": t.get("perplexity_general"),
        "train_records": data.get("assistant", {}).get("kept"),
    }


def headline_image(train: dict, merge: dict, ev: dict, records: int | None) -> dict:
    """The image recipes' numbers for `dvc metrics diff`; `records`: the training records kept."""
    t, b = ev.get("tuned", {}), ev.get("base", {})
    return {
        **_training_headline(train, merge),
        "answer_match_rate_base": b.get("answer_match_rate"), "answer_match_rate_tuned": t.get("answer_match_rate"),
        "answer_similarity_base": b.get("answer_similarity"), "answer_similarity_tuned": t.get("answer_similarity"),
        "train_records": records,
    }


def image_metric_names(reference: str) -> list[tuple[str, str]]:
    """The image recipes' evaluation rows; `reference`: what the data holds for an image (answer, caption)."""
    return [("answer_match_rate", f"answers equal to the data's {reference}"),
            ("answer_similarity", f"similarity to the data's {reference} (difflib ratio)"),
            ("mean_answer_tokens", "mean answer length (tokens)"),
            ("generation_tokens_per_sec", "generation tokens/s")]


LLAVA_SHARED_ROWS = ("model", "recipe", "LoRA", "quantization", "device / precision / DeepSpeed")


def llava_rows(p: P.Params, resolved: dict) -> list[list[Any]]:
    lv = p.llava
    return [
        ["vision encoder", f"{LLAVA_VISION} ({resolved.get('image_tokens')} image tokens per image), LoRA "
                           f"r={lv.visual_lora.r}, alpha={lv.visual_lora.alpha}, dropout={lv.visual_lora.dropout}"],
        ["projector", f"from {lv.pretrained_pth}" if lv.pretrained_pth else
         f"pretrained here: {lv.pretrain.max_iters} iterations at lr {lv.pretrain.lr}"],
        ["fine-tune", f"{p.train.max_iters} iterations, lr {p.train.lr}, warm-up {p.train.warmup_iters}, "
                      f"micro-batch {resolved.get('micro_batch')} x {resolved.get('grad_accum')} accumulation, "
                      "LengthGroupedSampler"],
    ]


def thumbnail(image: str, width: int = 64) -> str:
    """An <img> of the image itself, by its path relative to reports/ (GitHub renders it)."""
    import os

    rel = os.path.relpath(Path(image), REPORTS).replace(os.sep, "/")
    return f'<img src="{rel}" width="{width}" alt="{Path(image).name}">'


def params_rows(p: P.Params, resolved: dict) -> list[list[Any]]:
    t = p.train
    return [
        ["model", str(llm_dir(p.recipe))], ["recipe", p.recipe],
        ["assistant / author", f"{p.data.assistant.name} / {p.data.assistant.author}"],
        ["LoRA", f"r={p.lora.r}, alpha={p.lora.alpha}, dropout={p.lora.dropout}, targets={p.lora.target_modules}"],
        ["quantization", f"{p.quant.mode}, double quant {p.quant.double_quant}, compute {resolved.get('compute_dtype')}"],
        ["device / precision / DeepSpeed", f"{resolved.get('device')} x{resolved.get('gpus')} / "
                                           f"{resolved.get('precision')} / {resolved.get('deepspeed')}"],
        ["batch", f"{resolved.get('micro_batch')} x {resolved.get('grad_accum')} accumulation x {t.gpus} GPU "
                  f"= {t.global_batch} sequences of {p.data.max_length} tokens, packed {t.pack}"],
        ["memory", f"activation checkpointing {resolved.get('checkpointing')}, fused loss {t.fused_loss}, "
                   f"optimizer {t.optimizer}"
                   + (f", estimated {resolved.get('estimate_gb')} GB of {resolved.get('memory_gb')} GB"
                      if resolved.get("memory_gb") else "")],
        ["schedule", f"lr {t.lr}, warm-up {t.warmup_iters} iters, "
                     + (f"{t.max_iters} iterations" if t.max_iters else f"{t.epochs} epochs")],
    ]


def stage_rows() -> list[list[Any]]:
    rows = []
    for name in STAGE_ORDER:
        path = STAGE_TIMES / f"{name}.json"
        if path.is_file():
            s = json.loads(path.read_text())
            rows.append([name, s["wall_time_s"], s["peak_rss_mb"], s.get("peak_gpu_mb", "")])
    return rows


def _inputs(loss_title: str) -> tuple[dict, dict, dict, dict, dict, list]:
    """What both recipes' pages read (the rendered settings, data, training, merge and evaluation
    figures, the answers), with the loss curve drawn."""
    from stages.xtuner_api import read_pipeline

    resolved = read_pipeline(CONFIG)
    data = read_json(DATA_STATS, "run `dvc repro validate`")
    train = read_json(TRAIN_LIVE / "metrics.json", "run `dvc repro train`")
    merge = read_json(MERGE_METRICS, "run `dvc repro merge`")
    ev = read_json(EVAL_METRICS, "run `dvc repro evaluate`")
    rows = read_jsonl(GENERATIONS, "run `dvc repro evaluate`")
    plot_losses({"loss": read_tsv(LOSS_TSV.read_text())}, LOSS_PNG, loss_title)
    return resolved, data, train, merge, ev, rows


def build_report(p: P.Params) -> tuple[str, dict]:
    resolved, data, train, merge, ev, rows = _inputs("Training loss")
    kinds = ("trained", "heldout", "general")
    metric_names = [("identity_hit_rate_trained", "identity hit rate, trained prompts"),
                    ("identity_hit_rate_heldout", "identity hit rate, held-out paraphrases"),
                    ("general_identity_leak", "general answers naming the identity"),
                    ("perplexity_general", "perplexity, held-out general conversations"),
                    ("mean_answer_tokens", "mean answer length (tokens)"),
                    ("generation_tokens_per_sec", "generation tokens/s (after a warm-up)"),
                    ("start_s", "start-up: loading, warm-up (s)")]
    md = [
        f"# Fine-tune report: {p.recipe}", "",
        f"{llm_dir(p.recipe)} fine-tuned to answer as **{p.data.assistant.name}**, made by **{p.data.assistant.author}**. "
        "Generated by `dvc repro report`; compare experiments with `python -m stages.compare`.", "",
        "## Params", "", table(["", "value"], params_rows(p, resolved)), "",
        "## Data", "",
        table(["dataset", "records kept", "tokens min / p50 / p95 / max", "over max_length", "duplicates"],
              [[name, f"{s['kept']} of {s['records']}", "{min} / {p50} / {p95} / {max}".format(**s["tokens"]),
                s["over_max_length"], f"{s['duplicate_rate']:.1%}"]
               for name, s in data.items() if isinstance(s, dict)]), "",
        "## Training", "", f"![training loss]({LOSS_PNG.relative_to(REPORTS)})", "",
        table(["final loss", "first loss", "iterations", "tokens/s", "peak memory (MB)", "wall time (s)"],
              [[train.get("final_loss"), train.get("first_loss"), train.get("iters"), train.get("tokens_per_sec"),
                f"{train.get('peak_memory_mb')} ({train.get('peak_memory_kind')})", train.get("wall_time_s")]]), "",
        f"Merge check: base+adapter against the merged model ({merge['dtype']}), largest |logit| difference "
        f"{merge['max_logit_diff']:.2e} (tolerance {merge['tolerance']:g}).", "",
        f"## Evaluation ({ev['backend']}, greedy, {ev['prompts']} prompts)", "",
        table(["metric", "base", "tuned"], [[label, ev["base"].get(k), ev["tuned"].get(k)] for k, label in metric_names]),
        "",
    ]
    for kind in kinds:
        subset = [r for r in rows if r["kind"] == kind]
        if subset:
            md += [f"### Answers: {kind} prompts", "",
                   table(["prompt", "base", "tuned"], [[r["prompt"], r["base"], r["tuned"]] for r in subset]), ""]
    md += ["## Stages", "", table(["stage", "wall time (s)", "peak RSS (MB)", "peak GPU (MB)"], stage_rows()), ""]
    return "\n".join(md), headline(train, merge, ev, data)


def build_llava_report(p: P.Params) -> tuple[str, dict]:
    """The llava recipe's page: the same sections, image prompts with thumbnails."""
    resolved, data, train, merge, ev, rows = _inputs("Training loss (LLaVA fine-tune)")
    s = data.get("llava", {})
    metric_names = image_metric_names("answer")
    md = [
        f"# Fine-tune report: {p.recipe}", "",
        f"{llm_dir(p.recipe)} with the vision encoder {LLAVA_VISION}, fine-tuned on "
        f"{p.data.llava.source} as XTuner's LLaVA QLoRA recipe. Generated by `dvc repro report`; compare "
        "experiments with `python -m stages.compare`.", "",
        "## Params", "", table(["", "value"], [r for r in params_rows(p, resolved) if r[0] in LLAVA_SHARED_ROWS]
                               + llava_rows(p, resolved)), "",
        "## Data", "",
        image_data_table("llava", s), "",
        "## Training", "", f"![training loss]({LOSS_PNG.relative_to(REPORTS)})", "", image_training_table(train), "",
        f"Merge check (XTuner's `convert merge`, the LLM and `--is-clip`): base models + adapters against the "
        f"merged parts ({merge['dtype']}), largest |logit| difference {merge['max_logit_diff']:.2e} "
        f"(tolerance {merge['tolerance']:g}: float16 weights).", "",
        f"## Evaluation: image prompts (greedy, {ev['prompts']} images)", "",
        "Before fine-tuning: the LLM, the vision encoder and the pretrained projector. After: the merged "
        "fine-tune.", "",
        table(["metric", "before", "after"], [[label, ev["base"].get(k), ev["tuned"].get(k)] for k, label in metric_names]),
        "", "### Answers", "",
        table(["image", "prompt", "data's answer", "before fine-tuning", "after fine-tuning"],
              [[thumbnail(r["image"]), r["prompt"], r.get("reference") or "", r["base"], r["tuned"]] for r in rows]),
        "",
        "## Stages", "", table(["stage", "wall time (s)", "peak RSS (MB)", "peak GPU (MB)"], stage_rows()), "",
    ]
    return "\n".join(md), headline_image(train, merge, ev, s.get("kept"))


def image_data_table(name: str, s: dict) -> str:
    """An image recipe's data: records, tokens with the image's, images, duplicates."""
    if not s:
        return ""
    return table(["dataset", "records kept", "tokens (with the image's) min / p50 / p95 / max", "images", "duplicates"],
                 [[name, f"{s.get('kept')} of {s.get('records')}", "{min} / {p50} / {p95} / {max}".format(**s["tokens"]),
                   f"{s.get('unique_images')} unique in {s.get('image_records')} records",
                   f"{s.get('duplicate_rate', 0):.1%}"]])


def image_training_table(train: dict) -> str:
    return table(["final loss", "first loss", "iterations", "tokens/s", "peak memory (MB)", "wall time (s)"],
                 [[train.get("final_loss"), train.get("first_loss"), train.get("iters"), train.get("tokens_per_sec"),
                   f"{train.get('peak_memory_mb')} ({train.get('peak_memory_kind')})", train.get("wall_time_s")]])


def build_internvl_report(p: P.Params) -> tuple[str, dict]:
    """The internvl recipe's page: the llava page's sections, the tutorial's image prompt."""
    resolved, data, train, merge, ev, rows = _inputs("Training loss (InternVL QLoRA fine-tune)")
    s, iv = data.get("internvl", {}), p.internvl
    stand_in = p.stand_in is not None
    metric_names = image_metric_names("caption")
    settings = [r for r in params_rows(p, resolved) if r[0] in ("recipe", "quantization", "device / precision / DeepSpeed")]
    settings = [["model", str(INTERNVL_MODEL) + (" (the stand-in: it exercises the plumbing, it knows nothing; see README.md)"
                                     if stand_in else "")]] + settings + [
        ["LoRA (LLM)", f"r={p.lora.r}, alpha={p.lora.alpha}, dropout={p.lora.dropout}, all linear layers; "
                       "vision encoder frozen, mlp1 trained"],
        ["fine-tune", f"{p.train.max_iters} iterations, lr {p.train.lr}, warm-up {p.train.warmup_iters}, micro-batch "
                      f"{resolved.get('micro_batch')} x {resolved.get('grad_accum')} accumulation, LengthGroupedSampler"]]
    md = [
        f"# Fine-tune report: {p.recipe}", "",
        f"{INTERNVL_MODEL} fine-tuned on {p.data.internvl.source} as XTuner's internvl_v2_internlm2_2b_qlora_finetune "
        "(the tutorial's r=128 edit), converted with XTuner's convert_to_official. Generated by `dvc repro report`.", "",
        "## Params", "", table(["", "value"], settings), "",
        "## Data", "",
        image_data_table("internvl", s), "",
        "## Training", "", f"![training loss]({LOSS_PNG.relative_to(REPORTS)})", "", image_training_table(train), "",
        f"Conversion check (XTuner's convert_to_official, {merge['dtype']}, remote code copied: "
        f"{', '.join(merge.get('remote_code_copied') or []) or 'none needed'}): the trained model (LoRA merged in "
        f"float32, rounded to {merge['dtype']}) against the converted one, largest |logit| difference "
        f"{merge['max_logit_diff']:.2e} (tolerance {merge['tolerance']:g}); unrounded, "
        f"{merge.get('max_logit_diff_unrounded')} (what saving in {merge['dtype']} costs); the converted model "
        f"moved {merge.get('max_logit_change_from_base')} from the base model.", "",
        f"## Evaluation: “{iv.eval_prompt}” ({ev['backend']}, {ev.get('chat_template')}, greedy, "
        f"{ev['prompts']} images)", "",
        "Before fine-tuning: the model in internvl.path. After: the converted fine-tune.", "",
        table(["metric", "before", "after"], [[label, ev["base"].get(k), ev["tuned"].get(k)] for k, label in metric_names]),
        "", "### Answers", "",
        table(["image", "data's caption", "before fine-tuning", "after fine-tuning"],
              [[thumbnail(r["image"]), r.get("reference") or "", r["base"], r["tuned"]] for r in rows]),
        "",
        "## Stages", "", table(["stage", "wall time (s)", "peak RSS (MB)", "peak GPU (MB)"], stage_rows()), "",
    ]
    return "\n".join(md), {**headline_image(train, merge, ev, s.get("kept")),
                           "merge_max_logit_change_from_base": merge.get("max_logit_change_from_base")}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default=str(P.PARAMS), help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    params = P.load(args.params)
    build = {"llava": build_llava_report, "internvl": build_internvl_report}.get(params.recipe, build_report)
    text, numbers = build(params)
    write_text(REPORT, text)
    write_json(REPORTS / "metrics.json", numbers)
    print(f"[report] {REPORT}, {LOSS_PNG}, {REPORTS / 'metrics.json'}", flush=True)


if __name__ == "__main__":
    from stages.errors import run

    run(main, stage="report")
