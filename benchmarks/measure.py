"""Timing and memory of a training step on a CUDA GPU, and what the benchmarks share."""
from __future__ import annotations

import gc
import json
import time
from pathlib import Path
from typing import Callable

SEQ = 2048


def gpu() -> dict:
    import torch

    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "memory_gb": round(props.total_memory / 1e9, 1),
            "torch": torch.__version__, "cuda": torch.version.cuda}


def batch(micro_batch: int, vocab: int, seq: int = SEQ, seed: int = 0):
    """Packed sequences of random tokens: every position is a trained label, as in a packed dataset."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (micro_batch, seq), generator=g).cuda()
    return {"input_ids": ids, "labels": ids.clone()}


def free() -> None:
    import torch

    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def measure(step: Callable[[], None], tokens_per_step: int, warmup: int = 2, steps: int = 6) -> dict:
    """tokens/s over `steps` steps after `warmup`, and the peak GPU memory of all of them.
    A step that runs out of memory gives {"oom": True}."""
    import torch

    free()
    torch.cuda.reset_peak_memory_stats()
    try:
        for _ in range(warmup):
            step()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    except torch.OutOfMemoryError:
        free()
        return {"oom": True, "peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2)}
    return {"tokens_per_s": round(tokens_per_step * steps / seconds),
            "step_s": round(seconds / steps, 4),
            "peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
            "reserved_gb": round(torch.cuda.max_memory_reserved() / 1e9, 2)}


def append(path: Path | None, record: dict) -> None:
    """One JSON line per measurement, flushed at once: a run cut off keeps what it measured. To stdout, and to
    `path` when there is one."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)
