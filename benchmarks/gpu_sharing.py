"""What a second process's GPU work costs a trainer beside it on one GPU, by how the work is launched.

Two processes on one GPU (no MPS) do not run kernels side by side: the driver time-slices between their
contexts. The select stage's scorer beside the trainer (`select.during_training`) decodes in small steps of
many small kernels; this measures whether the trainer's loss follows the scorer's kernel launches or its GPU
time. A stand-in trainer replays one CUDA graph of large matmuls (as the train stage's graphs keep the GPU
busy); a stand-in scorer runs decoding-like steps (per step, `--layers` x 7 matmuls of `--batch` rows against
`--width`-square weights and their elementwise ops, then a sync, as greedy decoding reads its token) either
eagerly (one launch per kernel) or as one captured CUDA graph a step. Phases of `--seconds` each: the
trainer alone, each scorer alone, then the trainer beside each scorer. One JSON line to stdout and --out.

    python -m benchmarks.gpu_sharing [--seconds 8] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from pathlib import Path


def trainer(ready, go, out, seconds: float) -> None:
    import torch

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
        torch.cuda.synchronize()  # a training step reads its loss
        n += 1
    out.put(("trainer", n / (time.time() - start)))


def scorer(ready, go, out, seconds: float, mode: str, layers: int, batch: int, width: int) -> None:
    import torch

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--batch", type=int, default=31)
    ap.add_argument("--width", type=int, default=2048)
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
    p = rec["phases"]
    alone = p["trainer alone"]["trainer"]
    for mode in ("eager", "graph"):
        beside = p[f"trainer + {mode} scorer"]
        scorer_busy = beside[f"scorer_{mode}"] / p[f"{mode} scorer alone"][f"scorer_{mode}"]  # its share of its own pace
        rec[f"trainer_slowdown_{mode}"] = round(1 - beside["trainer"] / alone, 3)
        rec[f"scorer_pace_beside_{mode}"] = round(scorer_busy, 3)
    append(Path(args.out) if args.out else None, rec)


if __name__ == "__main__":
    main()
