"""The table of one benchmarks/speed.sh call: each peer at each micro-batch and each train-stage run,
with tokens/s, peak memory, MFU (benchmarks/shapes.py) and the ratio of the first train-stage run to
each peer.

    python -m benchmarks.speed_report benchmarks/results/speed/side-by-side.jsonl
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.shapes import SHAPES, mfu

NAMES = {"unsloth": "Unsloth", "liger": "transformers + peft + Liger Kernel", "hf": "transformers + peft (plain)"}


def rows(records: list[dict], stage: str | None = None) -> list[str]:
    """`stage`: the run to compare, the first train-stage run whose name contains it (default: the first)."""
    peers = [r for r in records if r.get("run") == "peer" and "tokens_per_s" in r]
    stages = [r for r in records if r.get("run", "").startswith("train stage") and r.get("status") == "ok"]
    if not stages:
        raise SystemExit("no train-stage run in the file")
    named = [r for r in stages if stage is None or stage in r["run"]]
    if not named:
        raise SystemExit(f"--stage: no train-stage run named with {stage!r}; the runs: "
                         + "; ".join(r["run"] for r in stages))
    ours = named[0]
    out = ["| run | micro-batch x accumulation | activation checkpointing | tokens/s | peak allocated | MFU | "
           f"{ours['run']} ÷ run |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in stages:
        s = r["resolved"]
        layers = s.get("checkpoint_layers")
        ckpt = f"first {layers} of the layers" if layers else ("every layer" if s["checkpointing"] else "none")
        rate = mfu(r["tokens_per_s"], SHAPES[r["shape"]], 64, s["max_length"], "H200")
        out.append(f"| {r['run']} (InternLM2 structure) | {s['micro_batch']} x {s['grad_accum']} | {ckpt} | "
                   f"{r['tokens_per_s']:,.0f} | {r['peak_gb']} GB | {rate:.1%} | "
                   f"{ours['tokens_per_s'] / r['tokens_per_s']:.2f}x |")
    for r in peers:
        out.append(f"| {NAMES[r['lib']]} ({r['shape']} as Llama) | {r['micro_batch']} x 1 | {r['checkpointing']} | "
                   f"{r['tokens_per_s']:,} | {r['peak_gb']} GB | {r['mfu']:.1%} | "
                   f"{ours['tokens_per_s'] / r['tokens_per_s']:.2f}x |")
    best = max(peers, key=lambda r: r["tokens_per_s"]) if peers else None
    if best:
        out.append("")
        out.append(f"{ours['run']}: {ours['tokens_per_s'] / best['tokens_per_s']:.2f}x the best peer "
                   f"({NAMES[best['lib']]} at micro-batch {best['micro_batch']}, {best['tokens_per_s']:,} tokens/s, "
                   f"{best['peak_gb']} GB); versions: "
                   + ", ".join(f"{k} {v}" for k, v in best.get("versions", {}).items()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="a speed.jsonl that benchmarks/speed.sh wrote")
    parser.add_argument("--stage", metavar="TEXT",
                        help="compare the first train-stage run whose name contains TEXT (default: the first run)")
    args = parser.parse_args()
    records = [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
    print("\n".join(rows(records, args.stage)))


if __name__ == "__main__":
    main()
