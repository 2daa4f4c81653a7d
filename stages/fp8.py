"""FP8 matrix products for the frozen 4-bit weights (`train.fp8`, off by default).

In a QLoRA step most of the GPU's time is the frozen weights' two products a layer: the forward
`x @ W.T` and the backward `grad_y @ W` (the frozen weight needs no gradient of its own). bitsandbytes
runs both in the compute dtype (bf16) from the 4-bit weight dequantised on the fly. Hopper and Ada GPUs
multiply float8 (e4m3) operands at twice bf16's rate, so with `train.fp8` both products run as
`torch._scaled_mm` on float8 copies made on the fly: the weight dequantised from NF4 as before, then
scaled to e4m3 per output row (forward) or per input column (backward); the activations and the
gradients per row (token). Scales are powers of two, so scaling is exact and only the rounding to e4m3's
3-bit mantissa is new; the product accumulates in float32 (promoted from the tensor cores' own sums less often
with fast accumulation, below) and comes out in bf16. The forward saves no
activation for this product (as bitsandbytes'), and nothing is kept between steps. Within a step, compiled
layers keep more: torch.compile finds the same dequantisation in the forward and the backward, computes it
once, and keeps the backward's float8 weight (per input column) from the forward pass, 1 byte a frozen
parameter of every layer not checkpointed (1.36 GB at the 1.8B shape; stages/memory.py counts it). Where
that does not fit the budget the planner turns it off (`fp8_keep`): the backward then dequantises through a
call of its own, which torch.compile cannot merge, and only the 4-bit weight stays (`tests/test_fp8.py`
reads what the compiled forward saves).

What stays in bf16: the LoRA branch (its A and B and their gradients), the norms, attention, the output
head and the loss. What differs from the bf16 products is rounding only: a product is 3.8% off the float32
one where bf16's is 0.23% (`tests/test_fp8.py` measures it on the CPU's `_scaled_mm`), and over 30 steps
on one H200 the losses stayed within 0.1% of the bf16 run's (`benchmarks/README.md`). A released model's
outlier channels are what per-token scales handle worst: with channels 30 and 1e4 times the rest the tiny
InternLM2's loss curve in float8 stays within 3% of float32's, about as near as bf16's (which CPU kernels move);
at 1e6 the other channels fall below e4m3's range and out of the product (`tests/test_fp8.py`). Not checked on a
released model's weights: a lever the user turns on, never the default.
Compiled, the dequantised weight goes to float8 without its bf16 rounding in between (inductor fuses the
casts), so compiled and eager runs round differently: both are e4m3 roundings of the same weight.

Fast accumulation (pipeline keys `fp8_fast_accum`, `fp8_fast_accum_grad`, both on with `train.fp8`): the forward
product and the backward's skip Hopper's periodic promotion of their float8 sums to float32 (torchao's float8 training
does so for the forward only). On one H200 in Unsloth's regime: +3.7% for the forward's, +5.3% for both, the same loss
to the fourth decimal over 30 steps, and the products' errors against float32 unchanged at the 1.8B shapes (0.0377
with and without, `benchmarks/fp8_matmul.py`): the rounding of the operands to e4m3 is the error, not the sums.

Why not torchao's float8 training (`Float8Linear`): it converts bf16 `nn.Linear` weights, not
bitsandbytes' 4-bit ones, and computes a weight gradient this product does not need.
"""
from __future__ import annotations

E4M3_MAX = 448.0


def _to_e4m3(t, dim: int):
    """`t` (2-D) scaled to float8 e4m3 along `dim` (one scale per slice across it), and the float32
    scales (keepdim), so that `q.float() * scale` is `t` rounded to e4m3. Power-of-two scales: exact."""
    import torch

    amax = t.abs().amax(dim=dim, keepdim=True).float().clamp(min=1e-30)
    scale = torch.exp2(torch.ceil(torch.log2(amax / E4M3_MAX)))
    return (t.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


def scaled_matmul(a, b, out_dtype, fast_accum: bool = False):
    """`a @ b.T` for 2-D `a` (M x K) and `b` (N x K) through float8: `a` scaled per row, `b` per row
    (per output column of the product). `fast_accum`: Hopper's float8 products accumulate without their
    periodic promotion to float32 (cuBLASLt's fast accumulation: faster, less exact over long sums; the CPU
    ignores it)."""
    import torch

    aq, sa = _to_e4m3(a, 1)
    bq, sb = _to_e4m3(b, 1)
    return torch._scaled_mm(aq, bq.t(), scale_a=sa, scale_b=sb.t(), out_dtype=out_dtype, use_fast_accum=fast_accum)


def _dequantized(packed, quant_state, dtype):
    from bitsandbytes import functional as F

    return F.dequantize_4bit(packed.view(-1, 1), quant_state).to(dtype)  # N x K


def _dequantized_apart(packed, quant_state, dtype):
    """`_dequantized`'s values by another call of bitsandbytes' kernel (its output dtype differs), which
    torch.compile cannot take for the forward's own and keep from the forward pass."""
    import torch
    from bitsandbytes import functional as F

    absmax = quant_state.absmax
    if quant_state.nested:
        absmax = F.dequantize_blockwise(quant_state.absmax, quant_state.state2) + quant_state.offset
    other = torch.bfloat16 if quant_state.dtype == torch.float32 else torch.float32
    return torch.ops.bitsandbytes.dequantize_4bit.default(
        packed.view(-1, 1), absmax.float(), quant_state.blocksize, quant_state.quant_type, quant_state.shape,
        other).to(dtype)


def _function():
    import torch

    class FrozenFP8(torch.autograd.Function):
        """y = x @ W.T for a frozen 4-bit W, both products in float8; no gradient for W."""

        @staticmethod
        def forward(ctx, x, packed, quant_state, keep, fast_accum, fast_accum_grad):
            n, k = quant_state.shape
            w = _dequantized(packed, quant_state, x.dtype)
            y = scaled_matmul(x.reshape(-1, k), w, x.dtype, fast_accum)
            ctx.quant_state, ctx.keep, ctx.fast_accum_grad = quant_state, keep, fast_accum_grad
            ctx.save_for_backward(packed)
            return y.view(*x.shape[:-1], n)

        @staticmethod
        def backward(ctx, grad):
            (packed,) = ctx.saved_tensors
            n, k = ctx.quant_state.shape
            # keep: the forward's dequantisation again, which torch.compile merges with it, keeping this
            # product's float8 weight from the forward pass; else a call of its own, redone here
            w = (_dequantized if ctx.keep else _dequantized_apart)(packed, ctx.quant_state, grad.dtype)
            # grad_x = grad @ W: W's rows of this product are its input columns
            grad_x = scaled_matmul(grad.reshape(-1, n), w.t().contiguous(), grad.dtype, ctx.fast_accum_grad)
            return grad_x.view(*grad.shape[:-1], k), None, None, None, None, None

    return FrozenFP8


_FN = None


def frozen_fp8(x, packed, quant_state, keep: bool = True, fast_accum: bool = False, fast_accum_grad: bool = False):
    """`x @ W.T` for the 4-bit `packed` weight, both products in float8. `keep`: compiled, the backward's
    float8 weight is kept from the forward pass (1 byte a parameter until the backward; faster), else the
    backward dequantises it again (QLoRA's memory). `fast_accum`: the forward product with fast accumulation
    (`scaled_matmul`), as torchao's float8 training does by default; `fast_accum_grad`: the backward's."""
    global _FN
    if _FN is None:
        _FN = _function()
    return _FN.apply(x, packed, quant_state, keep, fast_accum, fast_accum_grad)


def fits(x, quant_state) -> bool:
    """float8 products take every dimension divisible by 16 (cuBLASLt's rule)."""
    n, k = quant_state.shape
    return (x.is_floating_point() and n % 16 == 0 and k % 16 == 0 and x.shape[-1] == k
            and (x.numel() // k) % 16 == 0)


_CLASS = None


def _fp8_class():
    global _CLASS
    if _CLASS is None:
        import bitsandbytes as bnb
        import torch

        class FP8Linear4bit(bnb.nn.Linear4bit):
            """bitsandbytes' Linear4bit whose training-mode products run in float8 (`frozen_fp8`)."""

            keep_fp8 = True
            fast_accum = fast_accum_grad = False

            def forward(self, x):
                state = self.weight.quant_state
                dtype = self.compute_dtype or x.dtype
                if (not self.training or self.bias is not None or state is None or dtype != torch.bfloat16
                        or not fits(x, state)):
                    return super().forward(x)
                # the parameter itself: bitsandbytes' `.data` of it recurses under torch.compile
                return frozen_fp8(x.to(dtype), self.weight, state, self.keep_fp8, self.fast_accum,
                                  self.fast_accum_grad).to(x.dtype)

        _CLASS = FP8Linear4bit
    return _CLASS


def install(model, keep: bool = True, fast_accum: bool = False, fast_accum_grad: bool = False) -> int:
    """Every bitsandbytes `Linear4bit` of `model` (the frozen base layers peft's LoRA wraps) runs its
    training-mode products in float8 where the shapes fit (`fits`); in eval mode (chats, generation)
    bitsandbytes' own path. `keep`, `fast_accum`, `fast_accum_grad`: as `frozen_fp8`'s. Returns how many
    layers were switched."""
    import bitsandbytes as bnb

    cls, switched = _fp8_class(), 0
    for module in model.modules():
        if type(module) is bnb.nn.Linear4bit:
            module.__class__ = cls
            module.keep_fp8, module.fast_accum, module.fast_accum_grad = keep, fast_accum, fast_accum_grad
            switched += 1
    return switched


def check_gpu() -> str | None:
    """None where this GPU multiplies float8 (compute capability 8.9 or above: Ada, Hopper and later),
    else what it is."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) >= (8, 9):
        return None
    return f"{torch.cuda.get_device_name()} (compute capability {major}.{minor}; float8 needs 8.9 or above)"
