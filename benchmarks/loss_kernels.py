"""The loss head on its own: the train stage's fused linear cross-entropy (stages/kernels.py) as written and
compiled, beside Liger Kernel's fused linear cross-entropy and cut-cross-entropy (the well-kept libraries that do the
same job), on
one micro-batch of the 1.8B shape's head: 8,192 tokens, hidden 2,048, vocabulary 92,544, bf16, the head's
weight frozen as in QLoRA. Each is timed forward and backward (the gradient with respect to the hidden states),
with the extra GPU memory it takes over its inputs, and checked against the first one's loss and gradient.

    python -m benchmarks.loss_kernels --out FILE [--impls eager,compiled,liger] [--tokens 8192 ...]

One JSON line an implementation (`"run": "loss kernel"`). On the GPU machine both libraries are in the peers' kit:
`PYTHONPATH=/tmp/peers:/tmp/site` (benchmarks/speed.sh loss-kernels). Where an implementation cannot run (a library's
Triton kernels without a GPU, or not installed) its line says why.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

IMPLS = ("eager", "compiled", "liger", "cce")


def _shifted(labels):
    import torch

    from stages.kernels import IGNORE

    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE).reshape(-1)


def loss_fn(impl: str, chunk: int, backend: str | None):
    """(hidden (1, T, d), weight (V, d), labels (1, T)) -> the mean loss, labels shifted by one as transformers does."""
    from stages import kernels

    if impl in ("eager", "compiled"):
        if impl == "compiled" and backend:  # a test's backend in place of inductor (torch.compile as kernels calls it)
            import torch

            kernels.compiled_chunk_loss.cache_clear()
            real = torch.compile
            torch.compile = lambda fn, **kw: real(fn, backend=backend, **kw)
            try:
                kernels.compiled_chunk_loss()
            finally:
                torch.compile = real
        return lambda h, w, y: kernels.linear_cross_entropy(h, w, y, chunk, compiled=impl == "compiled")
    if impl == "liger":
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(ignore_index=-100)
        return lambda h, w, y: liger(w, h.reshape(-1, h.shape[-1]), _shifted(y))
    if impl == "cce":  # Apple's cut-cross-entropy, as its README calls it (its default gradient filter included)
        from cut_cross_entropy import linear_cross_entropy

        return lambda h, w, y: linear_cross_entropy(h, w, y, shift=True)
    raise ValueError(impl)


def measure(impl: str, tokens: int, hidden: int, vocab: int, reps: int, chunk_mb: int, backend: str | None,
            reference: dict | None) -> dict:
    import torch

    from stages import kernels

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    line = {"run": "loss kernel", "impl": impl, "tokens": tokens, "hidden": hidden, "vocab": vocab, "device": device,
            "chunk_tokens": kernels.chunk_tokens(vocab, chunk_mb << 20)}
    if impl in ("liger", "cce") and not cuda:
        return {**line, "status": "skipped: its Triton kernels need a GPU"}
    try:
        fn = loss_fn(impl, line["chunk_tokens"], backend)
    except ImportError as exc:
        return {**line, "status": f"skipped: {exc}"}
    gen = torch.Generator(device="cpu").manual_seed(0)
    dtype = torch.bfloat16
    weight = (torch.randn(vocab, hidden, generator=gen) * hidden ** -0.5).to(device, dtype)
    base = (torch.randn(1, tokens, hidden, generator=gen)).to(device, dtype)
    labels = torch.randint(0, vocab, (1, tokens), generator=gen)
    labels[:, :: 10] = -100  # some tokens unlabelled, as a prompt's are
    labels = labels.to(device)

    def step():
        h = base.detach().requires_grad_()
        loss = fn(h, weight, labels)
        loss.backward()
        return loss.detach(), h.grad

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for _ in range(3):  # compile, autotune, warm the allocator
        loss, grad = step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
    start = time.perf_counter()
    for _ in range(reps):
        loss, grad = step()
    sync()
    line.update(status="ok", ms=round((time.perf_counter() - start) / reps * 1e3, 3), loss=round(float(loss), 6))
    if cuda:
        line["extra_gb"] = round((torch.cuda.max_memory_allocated() - held) / 1e9, 3)
    if reference is not None:
        line["loss_diff"] = float(abs(loss.float() - reference["loss"].float()))
        line["grad_max_diff"] = float((grad.float() - reference["grad"].float()).abs().max())
    else:
        line["_tensors"] = {"loss": loss, "grad": grad}
    return line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="append the JSON lines here too")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated, of {', '.join(IMPLS)} (the first is the reference)")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens of one micro-batch (4 x 2048, the default's)")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=92544)
    parser.add_argument("--reps", type=int, default=20, help="timed forward and backward passes")
    parser.add_argument("--chunk-mb", type=int, default=1024, help="the fused loss's chunk budget (the planner's at 24 GB and up)")
    parser.add_argument("--backend", help="torch.compile backend for `compiled` (tests: aot_eager); default inductor")
    args = parser.parse_args(argv)
    impls = args.impls.split(",")
    unknown = [i for i in impls if i not in IMPLS]
    if unknown:
        raise SystemExit(f"error: --impls: {', '.join(unknown)} is not one of {', '.join(IMPLS)}")
    reference = None
    for impl in impls:
        line = measure(impl, args.tokens, args.hidden, args.vocab, args.reps, args.chunk_mb, args.backend, reference)
        if reference is None and "_tensors" in line:
            reference = line.pop("_tensors")
        text = json.dumps(line)
        print(text)
        if args.out:
            with args.out.open("a", encoding="utf-8") as f:
                f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
