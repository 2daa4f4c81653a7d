"""What the report pages are made of, shared by the recipes' report steps and `stages.compare`: the loss
curve, Markdown tables, headline numbers, the params and stage-time tables, image thumbnails."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stages import params as P
from stages.io import read_json, read_jsonl
from stages.paths import (CONFIG, DATA_STATS, EVAL_METRICS, GENERATIONS, LLAVA_VISION, LOSS_PNG, MERGE_METRICS,
                          REPORTS, STAGE_TIMES, TRAIN_LIVE, llm_dir)

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
        ["device / precision / DeepSpeed", f"{resolved.get('device')} x{resolved.get('gpus')}"
                                           + (f" on {t.nodes} nodes" if t.nodes > 1 else "") + " / "
                                           f"{resolved.get('precision')} / {resolved.get('deepspeed')}"],
        ["batch", f"{resolved.get('micro_batch')} x {resolved.get('grad_accum')} accumulation x {t.gpus * t.nodes} "
                  f"{'GPU' if resolved.get('device') == 'cuda' else 'CPU process'} "
                  f"= {t.global_batch} sequences of {p.data.max_length} tokens, packed {t.pack}"],
        ["memory", f"activation checkpointing {resolved.get('checkpointing')}"
                   + (f" (the first {resolved['checkpoint_layers']} layers)" if resolved.get("checkpoint_layers") else "")
                   + f", fused loss {t.fused_loss}, "
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


def inputs(loss_title: str) -> tuple[dict, dict, dict, dict, dict, list]:
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
