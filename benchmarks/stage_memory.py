"""Where the train stage's peak GPU memory goes: an mmengine hook that a benchmark adds to the rendered config
(`benchmarks/speed.sh memory`), and the table of what it wrote.

torch's allocator can keep a history of every allocation and free with the Python stack that made it
(`torch.cuda.memory._record_memory_history`). The hook turns it on before iteration START (env
STAGE_MEMORY_START, default 20: after compiling) and off after COUNT iterations (STAGE_MEMORY_COUNT, default one
optimizer step's micro-batches), replays the history to the moment the allocated total was highest (`peak_of`),
and appends one JSON line to STAGE_MEMORY_OUT (a .jsonl): the peak, what was allocated before the history began
(weights, the adapter's training state: one figure, no stacks), and the allocations live at the peak grouped by
the code that made them (`site_of`). `python -m benchmarks.stage_memory FILE` prints each line as a table.

What it answers: in Unsloth's memory regime (micro-batch 16, every layer checkpointed and offloaded) the stage
peaks 0.47 GB over Unsloth (benchmarks/README.md, "The loss compiled"), and the loss is not where it is.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections import defaultdict
from pathlib import Path


FREES = ("free_completed",)  # the allocator's allocated total falls when a free completes (after its stream's work)


def site_of(frames: list[dict]) -> str:
    """Who made an allocation: the innermost frame outside torch's own Python; code that torch.compile
    generated (its files live under a `torchinductor` cache) is named with the first frame outside torch
    that called it, since its file names are hashes."""
    generated = None
    for frame in frames:  # innermost first, as torch records them
        name = frame.get("filename", "")
        if "torchinductor" in name:
            generated = generated or f"{Path(name).name}:{frame.get('line')}"
            continue
        if "/torch/" in name or name.startswith("??") or not name:
            continue
        where = f"{_short(name)}:{frame.get('line')} ({frame.get('name')})"
        return f"compiled code called from {where}" if generated else where
    return f"compiled code {generated}" if generated else "torch (no frame outside it)"


def _short(path: str) -> str:
    """A path from the package or project folder on: `.../site-packages/peft/tuners/lora/layer.py` ->
    `peft/tuners/lora/layer.py`; `/work/main/stages/kernels.py` -> `stages/kernels.py`."""
    parts = Path(path).parts
    for marker in ("site-packages", "dist-packages", "transformers_modules"):
        if marker in parts:
            return "/".join(parts[parts.index(marker) + 1:])
    for top in ("stages", "benchmarks"):
        if top in parts:
            return "/".join(parts[len(parts) - 1 - parts[::-1].index(top):])
    return "/".join(parts[-2:])


def stack_of(frames: list[dict], depth: int = 4) -> list[str]:
    """The innermost `depth` frames outside torch's own Python, as `file:line (function)`: where in the model an
    allocation happened (the peak's own, in the JSON line)."""
    out = []
    for frame in frames:
        name = frame.get("filename", "")
        if "/torch/" in name or "torchinductor" in name or name.startswith("??") or not name:
            continue
        out.append(f"{_short(name)}:{frame.get('line')} ({frame.get('name')})")
        if len(out) == depth:
            break
    return out


def sizes_of(sizes: list[int], top: int = 3) -> str:
    """The largest block sizes of a site, with their counts: `537 MB x2, 134 MB x3`."""
    counts: dict[int, int] = defaultdict(int)
    for size in sizes:
        counts[round(size / 1e6)] += 1
    return ", ".join(f"{mb:,} MB x{n}" for mb, n in sorted(counts.items(), reverse=True)[:top])


def peak_of(trace: list[dict]) -> tuple[int, dict[int, dict]]:
    """Replay one device's trace: the highest allocated total it reached above where it began, and the
    allocations live at that moment (address -> the trace's alloc entry). A block freed in the trace but
    allocated before it began counts below zero: the total can fall under its start."""
    live: dict[int, dict] = {}
    total = best = 0
    best_at = -1
    for i, event in enumerate(trace):
        action = event.get("action")
        if action == "alloc":
            live[event["addr"]] = event
            total += event["size"]
            if total > best:
                best, best_at = total, i
        elif action in FREES:
            live.pop(event["addr"], None)
            total -= event["size"]
    if best_at < 0:
        return 0, {}
    live = {}
    for event in trace[:best_at + 1]:
        if event.get("action") == "alloc":
            live[event["addr"]] = event
        elif event.get("action") in FREES:
            live.pop(event["addr"], None)
    return best, live


def summarize(snapshot: dict, before: int, device: int = 0, top: int = 15) -> dict:
    """The JSON line: `before` (allocated when the history began), the peak the history adds, and the
    live allocations at that peak by site, largest first (the rest summed as one row)."""
    traces = snapshot.get("device_traces") or []
    trace = traces[device] if device < len(traces) else []
    added, live = peak_of(trace)
    by_site: dict[str, list[int]] = defaultdict(list)
    for event in live.values():
        by_site[site_of(event.get("frames") or [])].append(event["size"])
    rows = sorted(([site, sum(sizes), sizes] for site, sizes in by_site.items()), key=lambda r: -r[1])
    if len(rows) > top:
        rest = rows[top:]
        rows = rows[:top] + [[f"{len(rest)} other sites", sum(r[1] for r in rest), [z for r in rest for z in r[2]]]]
    last = next(reversed(live.values())) if live else {}  # the block that reached the peak: made last
    return {"before_gb": round(before / 1e9, 3), "added_gb": round(added / 1e9, 3),
            "peak_gb": round((before + added) / 1e9, 3), "events": len(trace),
            "peak_reached_by": stack_of(last.get("frames") or []),
            "live_at_peak": [{"site": s, "gb": round(b / 1e9, 3), "blocks": len(z), "largest": sizes_of(z)}
                             for s, b, z in rows]}


def table(line: dict) -> str:
    """One JSON line as a Markdown table."""
    out = [f"{line.get('run', 'the train stage')}: peak {line['peak_gb']} GB = {line['before_gb']} GB allocated before "
           f"the history began (weights, the adapter's training state) + {line['added_gb']} GB at the step's peak "
           f"({line['events']:,} allocator events), reached in {' < '.join(line.get('peak_reached_by') or ['?'])}",
           "", "| made by | GB at the peak | blocks | largest |", "| --- | --- | --- | --- |"]
    out += [f"| {row['site']} | {row['gb']:.3f} | {row['blocks']} | {row.get('largest', '')} |"
            for row in line["live_at_peak"]]
    return "\n".join(out)


@functools.cache
def _hook():
    """The hook class, made on first use: mmengine's hooks import bitsandbytes, which the table needs not."""
    from mmengine.hooks import Hook

    class StageMemory(Hook):
        """Record the allocator's history over COUNT iterations from START; one JSON line at the end of them."""

        priority = "LOWEST"

        def __init__(self) -> None:
            self.start = int(os.environ.get("STAGE_MEMORY_START", 20))
            self.count = int(os.environ.get("STAGE_MEMORY_COUNT", 0))
            self.out = Path(os.environ.get("STAGE_MEMORY_OUT", "stage-memory.jsonl"))
            self.before = 0

        def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
            import torch

            if runner.iter == self.start:
                self.count = self.count or getattr(runner.optim_wrapper, "_accumulative_counts", 1)
                torch.cuda.synchronize()
                self.before = torch.cuda.memory_allocated()
                torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python")

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
            import torch

            if self.count and runner.iter == self.start + self.count - 1:
                torch.cuda.synchronize()
                snapshot = torch.cuda.memory._snapshot()
                torch.cuda.memory._record_memory_history(enabled=None)
                line = {"iterations": [self.start, self.start + self.count - 1],
                        "max_allocated_gb": round(torch.cuda.max_memory_allocated() / 1e9, 3),
                        **summarize(snapshot, self.before, torch.cuda.current_device())}
                with self.out.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(line) + "\n")
                runner.logger.info("stage memory: " + table(line).replace("\n", " / "))

    StageMemory.__qualname__ = "StageMemory"  # as mmengine writes the config: the module's name resolves to it
    return StageMemory


def __getattr__(name: str):
    """`from benchmarks.stage_memory import StageMemory` (the line a benchmark adds to the rendered config)."""
    if name == "StageMemory":
        return _hook()
    raise AttributeError(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The tables of the JSON lines StageMemory wrote.")
    parser.add_argument("file", type=Path, help="a .jsonl written by StageMemory (STAGE_MEMORY_OUT)")
    args = parser.parse_args(argv)
    try:
        lines = [json.loads(text) for text in args.file.read_text(encoding="utf-8").splitlines() if text.strip()]
        tables = [table(line) for line in lines]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"error: {args.file}: not a file of StageMemory's JSON lines ({type(exc).__name__}: {exc})")
    print("\n\n".join(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
