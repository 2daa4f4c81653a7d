"""The frozen 4-bit weights' products alone: bitsandbytes' bf16 path against `train.fp8`'s float8 one
(stages/fp8.py), forward and the backward's input gradient, at the linear layers' shapes of the 1.8B
and 7B InternLM2 structures, eager and compiled (as the train stage compiles its decoder layers); the float8
one also with cuBLASLt's fast accumulation, in the forward product (`fp8-fast`) and in both (`fp8-fast-both`:
pipeline keys `fp8_fast_accum`, `fp8_fast_accum_grad`).

    python -m benchmarks.fp8_matmul [--tokens 8192] [--paths bnb,fp8] [--out FILE]   # compute capability 8.9+

One JSON line a shape and path: milliseconds for a forward and backward, the effective TFLOP/s
(two products of 2 x tokens x in x out each), and the relative error (Frobenius) of the output and of
the input gradient against float32 products of the same dequantised weight.
"""
from __future__ import annotations

import argparse
import json
import time

PATHS = ("bnb", "fp8", "fp8-fast", "fp8-fast-both")
SHAPES = {  # name: (in, out) of each frozen linear in a decoder layer
    "1.8B wqkv": (2048, 4096), "1.8B wo": (2048, 2048), "1.8B w1/w3": (2048, 8192), "1.8B w2": (8192, 2048),
    "7B wqkv": (4096, 6144), "7B wo": (4096, 4096), "7B w1/w3": (4096, 14336), "7B w2": (14336, 4096),
}


def main(argv=None) -> None:
    import bitsandbytes as bnb
    import torch
    from bitsandbytes import functional as F

    from stages import fp8

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--modes", default="eager,compiled")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated names of SHAPES")
    parser.add_argument("--paths", default=",".join(PATHS), help="comma-separated names of PATHS")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    dev = args.device
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def bnb_path(x, w):
        return bnb.matmul_4bit(x, w, quant_state=w.quant_state)

    def fp8_path(fast, fast_grad):
        return lambda x, w: fp8.frozen_fp8(x, w, w.quant_state, fast_accum=fast, fast_accum_grad=fast_grad)

    paths = {"bnb": bnb_path, "fp8": fp8_path(False, False), "fp8-fast": fp8_path(True, False),
             "fp8-fast-both": fp8_path(True, True)}
    paths = {name: paths[name] for name in args.paths.split(",")}
    compiled = {name: torch.compile(fn) for name, fn in paths.items()}
    lines = []
    for shape in args.shapes.split(","):
        k, n = SHAPES[shape]
        weight = bnb.nn.Params4bit(torch.randn(n, k) * 0.02, requires_grad=False, quant_type="nf4",
                                   compress_statistics=True).to(dev)
        w32 = F.dequantize_4bit(weight.data, weight.quant_state).float()
        x = torch.randn(args.tokens, k, device=dev, dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(args.tokens, n, device=dev, dtype=torch.bfloat16)
        ref_y, ref_gx = x.detach().float() @ w32.t(), g.float() @ w32
        for mode in args.modes.split(","):
            for name, fn in paths.items():
                fn = compiled[name] if mode == "compiled" else fn

                def step():
                    x.grad = None
                    y = fn(x, weight)
                    y.backward(g)
                    return y

                for _ in range(3):
                    y = step()
                sync()
                began = time.perf_counter()
                for _ in range(args.reps):
                    step()
                sync()
                ms = (time.perf_counter() - began) * 1e3 / args.reps
                err_y = ((y.float() - ref_y).norm() / ref_y.norm()).item()
                err_gx = ((x.grad.float() - ref_gx).norm() / ref_gx.norm()).item()
                rec = {"shape": shape, "in": k, "out": n, "tokens": args.tokens, "path": name, "mode": mode,
                       "ms_fwd_bwd": round(ms, 3), "tflops": round(4 * args.tokens * k * n / ms / 1e9, 1),
                       "rel_err_out": round(err_y, 4), "rel_err_grad_in": round(err_gx, 4),
                       "gpu": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__}
                print(json.dumps(rec), flush=True)
                lines.append(rec)
    if args.out:
        with open(args.out, "a") as f:
            for rec in lines:
                f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
