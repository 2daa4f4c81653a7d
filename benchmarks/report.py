"""Tables of the benchmark's figures, from the JSON lines the GPU runs wrote.

    python -m benchmarks.report benchmarks/results/h100      # Markdown on stdout, summary.json beside

Each `runN-*.jsonl` holds one call to the GPU machine; the side-by-side comparison (plain loop,
project default, tutorial) comes from a single call, so its rows share one machine and one warm-up.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.shapes import SHAPES, flops_per_token, peak_flops

SEQ, R = 2048, 64
BUDGET_GB = 24


def rows(folder: Path, pattern: str) -> list[dict]:
    out = []
    for path in sorted(folder.glob(pattern)):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                out.append({**json.loads(line), "file": path.name})
    return out


def mfu(tokens_per_s: float | None, shape: str, gpu: str) -> str:
    peak = peak_flops(gpu)
    if not tokens_per_s or peak is None:
        return ""
    return f"{tokens_per_s * flops_per_token(SHAPES[shape], R, SEQ) / peak:.1%}"


def fmt(n: float | None) -> str:
    return "" if n is None else f"{n:,.0f}"


def lever_name(r: dict) -> str:
    parts = [f"micro-batch {r['micro_batch']}", "checkpointing" if r["checkpointing"] else "no checkpointing"]
    if r["fused_loss"]:
        parts.append("fused loss" + (f" ({r['loss_chunk_mb']} MB chunks)" if r.get("loss_chunk_mb", 1024) != 1024 else ""))
    if not r["upcast_frozen"]:
        parts.append("frozen bf16")
    if r["dropout"] == 0:
        parts.append("LoRA dropout 0")
    if r["optimizer"] != "adamw":
        parts.append(r["optimizer"])
    if r.get("compile"):
        parts.append("compiled layers")
    return ", ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    gpu = (args.folder / "gpu.txt").read_text(encoding="utf-8").split(",")[0].strip()
    levers, stages = rows(args.folder, "*levers.jsonl"), rows(args.folder, "*stage.jsonl")
    out: list[str] = []

    # 1. side by side, one call
    compare_plain = [r for r in levers if r["file"].startswith("run3") and r["run"] == "plain QLoRA loop"]
    compare_stage = [r for r in stages if r["file"].startswith("run3")]
    best_plain = max((r for r in compare_plain if r.get("peak_gb", 1e9) <= BUDGET_GB and "tokens_per_s" in r),
                     key=lambda r: r["tokens_per_s"])
    out += [f"### 1.8B shape, one call, side by side ({gpu})", "",
            "| run | micro-batch x accumulation | tokens/s | peak GPU memory | MFU | vs plain loop's best in 24 GB |",
            "| --- | --- | --- | --- | --- | --- |"]
    for r in compare_plain:
        mem = f"{r['peak_gb']} GB" + ("" if r["peak_gb"] <= BUDGET_GB else " (over 24 GB)")
        out.append(f"| plain transformers+peft+bitsandbytes QLoRA loop | {r['micro_batch']} x 1 | "
                   f"{fmt(r['tokens_per_s'])} | {mem} | {mfu(r['tokens_per_s'], 'internlm2-1_8b', gpu)} | "
                   f"{r['tokens_per_s'] / best_plain['tokens_per_s']:.2f}x |")
    for r in compare_stage:
        res = r["resolved"]
        out.append(f"| train stage: {r['run']} | {res['micro_batch']} x {res['grad_accum']} | {fmt(r['tokens_per_s'])} | "
                   f"{r['peak_gb']} GB | {mfu(r['tokens_per_s'], 'internlm2-1_8b', gpu)} | "
                   f"{r['tokens_per_s'] / best_plain['tokens_per_s']:.2f}x |")

    # 2. 7B
    seven = [r for r in levers if r["shape"] == "7b"]
    out += ["", f"### 7B shape ({gpu})", "", "| run | settings | tokens/s | peak GPU memory | MFU |",
            "| --- | --- | --- | --- | --- |"]
    for r in seven:
        if "tokens_per_s" not in r:
            continue
        what = f"micro-batch {r['micro_batch']}, {r['settings']}" if r["run"] == "plain QLoRA loop" else lever_name(r)
        out.append(f"| {r['run']} ({r['file'].split('-')[0]}) | {what} | {fmt(r['tokens_per_s'])} | {r['peak_gb']} GB | "
                   f"{mfu(r['tokens_per_s'], '7b', gpu)} |")
    for r in stages:
        if r["run"].startswith("7B"):
            res = r["resolved"]
            out.append(f"| train stage: {r['run']} | micro-batch {res['micro_batch']} x {res['grad_accum']}, "
                       f"checkpointing, fused loss ({res['loss_chunk_mb']} MB chunks), frozen bf16, paged_adamw8bit, "
                       f"compiled layers | {fmt(r['tokens_per_s'])} | {r['peak_gb']} GB | {mfu(r['tokens_per_s'], '7b', gpu)} |")

    # 3. levers, 1.8B
    one = [r for r in levers if r["shape"] == "internlm2-1_8b" and r["run"] != "plain QLoRA loop"]
    out += ["", f"### Levers, 1.8B shape, one at a time and together ({gpu})", "",
            "| settings | tokens/s | peak GPU memory (reserved) | MFU | call |", "| --- | --- | --- | --- | --- |"]
    for r in one:
        if "tokens_per_s" in r:
            out.append(f"| {lever_name(r)}{' (XTuner default)' if r['upcast_frozen'] and not r['fused_loss'] and r['checkpointing'] and r['micro_batch'] == 1 and r['dropout'] else ''} | "
                       f"{fmt(r['tokens_per_s'])} | {r['peak_gb']} GB ({r['reserved_gb']}) | "
                       f"{mfu(r['tokens_per_s'], 'internlm2-1_8b', gpu)} | {r['file'].split('-')[0]} |")
        else:
            out.append(f"| {lever_name(r)} | out of memory | | | {r['file'].split('-')[0]} |")

    extra = [r for r in stages if r["run"].startswith("convert")]
    if extra:
        e = extra[-1]
        out += ["", f"Convert (XTuner pth_to_hf) + merge, 1.8B: {e['convert_s']} s + {e['merge_s']} s."]
    print("\n".join(out))
    summary = {"gpu": gpu, "plain_best_in_24gb": best_plain, "compare": compare_stage,
               "seven_b": [r for r in stages if r["run"].startswith("7B")], "convert_merge": extra}
    (args.folder / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
