"""What a second process's GPU work costs a trainer beside it on one GPU, by how the work is launched.

Two processes on one GPU (no MPS) do not run kernels side by side: the driver time-slices between their
contexts. The select stage's scorer beside the trainer (`select.during_training`) decodes in small steps of
many small kernels; this measures whether the trainer's loss follows the scorer's kernel launches or its GPU
time. A stand-in trainer replays one CUDA graph of large matmuls (as the train stage's graphs keep the GPU
busy); a stand-in scorer runs decoding-like steps (per step, `--layers` x 7 matmuls of `--batch` rows against
`--width`-square weights and their elementwise ops, then a sync, as greedy decoding reads its token) either
eagerly (one launch per kernel) or as one captured CUDA graph a step. Phases of `--seconds` each: the
trainer alone, each scorer alone, then the trainer beside each scorer. One JSON line to stdout and --out.

`--threads` adds the same pairs in one process: the scorer a thread of the trainer's process on its own
CUDA stream at the lowest priority (one context, so kernels of both may run side by side on the GPU's
multiprocessors instead of taking turns), the trainer's stream at the highest; Python's switch interval
then decides how long the trainer's thread waits for the interpreter lock after each step.

    python -m benchmarks.gpu_sharing [--seconds 8] [--threads] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from pathlib import Path


def trainer(ready, go, out, seconds: float, stream=None) -> None:
    import torch

    if stream is not None:  # a thread of a shared process: its own stream for everything below
        with torch.cuda.stream(stream):
            return trainer(ready, go, out, seconds)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    c = torch.empty_like(a)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        for _ in range(3):
            torch.matmul(a, b, out=c)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(40):  # about 40 ms of work on an H200
            torch.matmul(a, b, out=c)
    graph.replay()
    torch.cuda.synchronize()
    ready.set()
    go.wait()
    n, start = 0, time.time()
    while time.time() - start < seconds:
        graph.replay()
        torch.cuda.current_stream().synchronize()  # a training step reads its loss (its stream's work alone)
        n += 1
    out.put(("trainer", n / (time.time() - start)))


def scorer(ready, go, out, seconds: float, mode: str, layers: int, batch: int, width: int, stream=None) -> None:
    import torch

    if stream is not None:
        with torch.cuda.stream(stream):
            return scorer(ready, go, out, seconds, mode, layers, batch, width)
    ws = [torch.randn(width, width, device="cuda", dtype=torch.bfloat16) / width ** 0.5 for _ in range(7)]
    x0 = torch.randn(batch, width, device="cuda", dtype=torch.bfloat16)
    x = x0.clone()

    def step() -> None:
        h = x
        for _ in range(layers):
            n = h * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(h.dtype)
            q, k, v = n @ ws[0], n @ ws[1], n @ ws[2]
            h = h + (torch.softmax(q * k, -1) * v) @ ws[3]
            n = h * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(h.dtype)
            h = h + (torch.nn.functional.silu(n @ ws[4]) * (n @ ws[5])) @ ws[6]
        x.copy_(h / h.abs().amax())

    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        for _ in range(3):
            step()
    torch.cuda.synchronize()
    run = step
    if mode == "graph":
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        run = graph.replay
    ready.set()
    go.wait()
    n, start = 0, time.time()
    while time.time() - start < seconds:
        run()
        x.sum().item()  # greedy decoding reads its next token
        n += 1
    out.put((f"scorer_{mode}", n / (time.time() - start)))


def phase(ctx, seconds: float, roles: list[tuple], timeout: float = 300) -> dict:
    ready = [ctx.Event() for _ in roles]
    go, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=fn, args=(r, go, out, seconds, *extra)) for r, (fn, *extra) in zip(ready, roles)]
    for p in procs:
        p.start()
    for r in ready:
        r.wait(timeout)
    go.set()
    rates = dict(out.get(timeout=timeout) for _ in procs)
    for p in procs:
        p.join()
    return {k: round(v, 2) for k, v in rates.items()}


def threads(seconds: float, roles: list[tuple], switch: float | None, timeout: float = 300) -> dict:
    """`roles` as threads of this process, the first (the trainer) on the highest-priority stream, the others on
    the lowest; `switch`: Python's switch interval for the phase (None: its default, 5 ms)."""
    import queue
    import sys
    import threading

    import torch

    low, high = torch.cuda.Stream.priority_range()  # (lowest, highest): e.g. (0, -5)
    streams = [torch.cuda.Stream(priority=high if i == 0 else low) for i in range(len(roles))]
    ready = [threading.Event() for _ in roles]
    go, out = threading.Event(), queue.Queue()
    default = sys.getswitchinterval()
    sys.setswitchinterval(switch or default)
    try:
        ts = [threading.Thread(target=fn, args=(r, go, out, seconds, *extra), kwargs={"stream": st})
              for r, st, (fn, *extra) in zip(ready, streams, roles)]
        for t, r in zip(ts, ready):  # one at a time: a graph is captured while no other thread launches work
            t.start()
            r.wait(timeout)
        go.set()
        rates = dict(out.get(timeout=timeout) for _ in ts)
        for t in ts:
            t.join()
    finally:
        sys.setswitchinterval(default)
    return {k: round(v, 2) for k, v in rates.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--batch", type=int, default=31)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--threads", action="store_true",
                    help="also the pairs as two threads of one process, each on its own stream")
    ap.add_argument("--out")
    args = ap.parse_args()
    import torch

    from benchmarks.measure import append

    ctx = mp.get_context("spawn")
    shape = (args.layers, args.batch, args.width)
    rec = {"device": torch.cuda.get_device_name(0), "seconds": args.seconds,
           "scorer_step": f"{args.layers} layers x 7 matmuls ({args.batch} x {args.width} by {args.width} square), "
                          f"about {args.layers * 22} kernels", "phases": {}}
    phases = {"trainer alone": [(trainer,)],
              "eager scorer alone": [(scorer, "eager", *shape)],
              "graph scorer alone": [(scorer, "graph", *shape)],
              "trainer + eager scorer": [(trainer,), (scorer, "eager", *shape)],
              "trainer + graph scorer": [(trainer,), (scorer, "graph", *shape)]}
    for name, roles in phases.items():
        rec["phases"][name] = phase(ctx, args.seconds, roles)
        print(json.dumps({name: rec["phases"][name]}), flush=True)
    pairs = {mode: f"trainer + {mode} scorer" for mode in ("eager", "graph")}
    if args.threads:
        for mode in ("eager", "graph"):
            for switch in (None, 0.0005):
                name = f"trainer + {mode} scorer, threads, switch interval {1000 * (switch or 0.005):g} ms"
                rec["phases"][name] = threads(args.seconds, [(trainer,), (scorer, mode, *shape)], switch)
                pairs[f"{mode}_threads_{1000 * (switch or 0.005):g}ms"] = name
                print(json.dumps({name: rec["phases"][name]}), flush=True)
    p = rec["phases"]
    alone = p["trainer alone"]["trainer"]
    for key, name in pairs.items():
        mode = key.split("_")[0]
        beside = p[name]
        scorer_busy = beside[f"scorer_{mode}"] / p[f"{mode} scorer alone"][f"scorer_{mode}"]  # its share of its own pace
        rec[f"trainer_slowdown_{key}"] = round(1 - beside["trainer"] / alone, 3)
        rec[f"scorer_pace_beside_{key}"] = round(scorer_busy, 3)
    append(Path(args.out) if args.out else None, rec)


if __name__ == "__main__":
    main()
