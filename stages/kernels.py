"""What the train stage installs into XTuner's model building: a fused linear cross-entropy, frozen
weights kept in the compute dtype, compiled decoder layers, and checkpointing of some layers only.

A causal LM's loss is usually `cross_entropy(lm_head(h), labels)`. For InternLM2's 92,544-token
vocabulary that materialises, per micro-batch of T tokens, T x 92,544 logits, their float32 copy
and their gradient: 1.1 MB per token, 18 GB for a micro-batch of 8 x 2048. The fused loss walks
the tokens in chunks, and for each chunk computes the logits, the loss and at once the gradient of
the loss with respect to the hidden states (`(softmax - onehot) @ W`), then drops the logits. Peak
memory for the loss falls to one chunk's logits (about 1 GB), and the backward pass is a multiply.
Each chunk's softmax, loss and gradient are one expression of the logits (`chunk_loss`), which torch.compile
makes two kernels where layers are compiled (`compile_loss`): as written it is about ten passes over a float32
copy of the logits, 10% of the 1.8B shape's step on an H200, and compiled the stage trained 11% faster there.

Exact: the same loss and gradients as transformers' `ForCausalLMLoss` (mean over the labelled
tokens, labels shifted by one, -100 ignored); `tests/test_kernels.py` checks both against it.

It is installed per model instance by wrapping XTuner's `dispatch_modules`, so it reaches the model
XTuner builds from the rendered config, and only while training with labels; generation and
evaluation use the model's own forward.

Frozen weights: peft's `prepare_model_for_kbit_training`, which XTuner calls for every QLoRA run,
casts every weight that is not 4-bit (embeddings, output head, norms) to float32: for a 92k
vocabulary that is 1.5 GB more for a 1.8B model and 3 GB for a 7B one, and makes the output head a
float32 matmul. With `upcast_frozen: false` they go back to the compute dtype after that call.

Attention: a model whose remote code reads `attn_implementation` from its config.json (InternLM2's
says `eager`) trains with the SDPA class of the same code (`use_sdpa`); on a GPU, InternLM2's without its
keys and values copied to every query head (`use_gqa`, pipeline key `gqa`).

Rotary embedding: InternLM2's dynamic NTK rotary embedding (`rope_scaling: dynamic` in the released
config.json) asks `max(position_ids) + 1 > max_position_embeddings` in every layer's forward: a wait
for the GPU in every layer, and a graph break that cuts each compiled layer into six graphs. Below
that length it is the plain rotary embedding of the same code, so a run whose sequences are no longer
than `max_position_embeddings` trains with that class (`static_rope`). On a GPU its cos and sin come from a
table of the run's positions (`rope_table`, pipeline key `rope_table`), not from two transcendentals an element
of every head in every layer.

Tuned kernels (`train.tune_kernels`, off by default): inductor's multi-kernel row reductions and coordinate-descent
tuning of the compiled code's kernels on this machine (`tune_kernels`); each run compiles about 3 minutes longer.

Compiled layers: a QLoRA step is hundreds of small kernels a layer (4-bit dequantisation, LoRA's
dropout, scale and add, norms, RoPE, SwiGLU), each launched from Python; on an H100 the GPU waits
for the launches. `torch.compile` of each decoder layer fuses the element-wise work and cuts the
launches. Only the training-mode forward is compiled: generation during training (XTuner's chat
hook puts the model in eval mode) changes shapes every token and runs the layer as written.

CUDA graphs (`train.cuda_graphs`, on by default where they apply): even compiled, a layer's forward and backward are
about 80 launches from the host (matmuls, 4-bit dequantisation, Triton kernels), and on an H200 at the
1.8B shape the host needs about as long to launch them as the GPU to run them. Replayed as CUDA graphs
(torch.compile's reduce-overhead mode), a layer is one launch each way and the host can run ahead of the
GPU, which it does once the loop stops waiting for it too (stages/overlap.py). Layer 0 is recorded apart
(its input needs no gradient, a guard of its own). Not with checkpointed layers (their forward runs
twice, once without gradients).

Offloaded checkpoints (`train.offload_activations`, off by default): a checkpointed layer keeps its
input on the GPU until the backward pass rebuilds the layer from it: 2 bytes x hidden a token a layer,
3.2 GB for the 1.8B shape at micro-batch 16 with every layer checkpointed. With the lever the input is
copied to pinned host memory as the forward pass saves it, on a stream of its own beside the compute (Unsloth
copies on the compute stream), and back on the compute stream as the backward pass needs it, neither waiting for
the host, so every layer is checkpointed by `checkpoint_first` (torch's reentrant checkpoint, whose saved inputs
the copy catches). Measured: benchmarks/README.md.

MLPs in slices (`tile_mlp`, pipeline key `tile_mlp`: the planner's slice count where every checkpointed layer's
LoRA has no dropout, on a GPU): a checkpointed layer's MLP is rebuilt and differentiated a slice of the tokens
at a time, so its intermediate-wide activations, the largest share of the step's peak in Unsloth's regime, are
alive a slice at a time.
"""
from __future__ import annotations

import functools
import types
from typing import Any

IGNORE = -100
CHUNK_BYTES = 1 << 30  # logits of one chunk, float32, plus their softmax


def chunk_tokens(vocab: int, budget: int = CHUNK_BYTES) -> int:
    """Tokens per chunk: a power of two whose float32 logits and softmax fit the budget."""
    n = max(1, budget // (vocab * 8))
    return 1 << (n.bit_length() - 1)


def chunk_loss(logits, labels, valid):
    """One chunk's summed loss (float32) and its gradient with respect to the logits, `softmax - onehot` on
    the labelled rows and 0 on the others, in the logits' dtype. In float32 between the two, as
    transformers' loss upcasts the logits. Written as one expression of the logits so that torch.compile
    (`train.compile_layers`: `compile_loss` in the rendered config) makes it two kernels that read the
    logits three times and write the gradient once; run as written, it is about ten passes over a float32
    copy, 10% of the 1.8B shape's GPU step (benchmarks/README.md, "The loss compiled")."""
    import torch

    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    safe = labels.clamp(min=0)
    mask = valid.to(x.dtype)
    loss = ((lse - x.gather(1, safe.unsqueeze(1)).squeeze(1)) * mask).sum()
    hit = torch.arange(x.shape[1], device=x.device).unsqueeze(0) == safe.unsqueeze(1)
    grad = (torch.exp(x - lse.unsqueeze(1)) - hit.to(x.dtype)) * mask.unsqueeze(1)
    return loss, grad.to(logits.dtype)


@functools.cache
def compiled_chunk_loss():
    """`chunk_loss` through torch.compile, for one shape of chunk (the last, shorter one compiles once more)."""
    import torch

    return torch.compile(chunk_loss, dynamic=False, fullgraph=True)


@functools.cache
def _linear_cross_entropy():
    """The autograd function, built on first use so that importing this module imports no torch."""
    import torch

    class LinearCrossEntropy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, labels, chunk, step):
            # hidden: (T, d) in the activations' dtype; weight: (V, d); labels: (T,), shifted.
            # The gradients are computed here, chunk by chunk, and only scaled in backward.
            valid = labels != IGNORE
            w = weight.to(hidden.dtype) if weight.dtype != hidden.dtype else weight
            need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            grad_h = torch.empty_like(hidden) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, hidden.shape[0], chunk):
                h, y, m = hidden[start:start + chunk], labels[start:start + chunk], valid[start:start + chunk]
                loss, probs = step(h @ w.t(), y, m)  # the logits in the activations' dtype, as a plain head's
                total += loss
                if need_h:
                    grad_h[start:start + chunk] = probs @ w
                if need_w:
                    grad_w += (probs.t() @ h).float()
                del probs
            denom = valid.sum().clamp(min=1).float()
            ctx.grads, ctx.denom, ctx.weight_dtype = (grad_h, grad_w), denom, weight.dtype
            return total / denom

        @staticmethod
        def backward(ctx, grad_out):
            if ctx.grads is None:
                raise RuntimeError("the fused loss's backward runs once a forward (retain_graph is not supported)")
            # taken off ctx: the graph keeps ctx until the whole backward pass ends, and the gradient of the
            # hidden states (the size of a layer's input) would stay with it; scaled in place, no second copy
            grad_h, grad_w = ctx.grads
            ctx.grads = None
            scale = grad_out / ctx.denom
            gh = grad_h.mul_(scale.to(grad_h.dtype)) if grad_h is not None else None
            gw = (grad_w * scale).to(ctx.weight_dtype) if grad_w is not None else None
            return gh, gw, None, None, None

    return LinearCrossEntropy


def linear_cross_entropy(hidden, weight, labels, chunk: int | None = None, compiled: bool = False):
    """Mean next-token cross-entropy of `hidden @ weight.T` against `labels` (B, S), shifted by one
    as transformers does, without materialising the logits; `compiled`: each chunk's math through
    torch.compile (`compiled_chunk_loss`)."""
    import torch

    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE).reshape(-1)
    flat = hidden.reshape(-1, hidden.shape[-1])
    chunk = chunk or chunk_tokens(weight.shape[0])
    step = compiled_chunk_loss() if compiled else chunk_loss
    return _linear_cross_entropy().apply(flat, weight, shifted.to(flat.device), chunk, step)


def _plain_head(model) -> Any:
    import torch

    head = model.get_output_embeddings()
    return head if type(head) is torch.nn.Linear and head.bias is None else None


def install_fused_loss(model) -> bool:
    """Give this causal LM instance the fused loss for training; False where its head is not a
    plain linear layer (then nothing changes)."""
    if _plain_head(model) is None or getattr(model, "_fused_loss", False):
        return False
    original = model.forward
    decoder = getattr(model, model.base_model_prefix)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, **kwargs):
        head = _plain_head(self)
        if labels is None or not self.training or head is None or not self._fused_loss:
            return original(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels,
                            use_cache=use_cache, output_attentions=output_attentions,
                            output_hidden_states=output_hidden_states, return_dict=return_dict, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        kwargs.pop("num_items_in_batch", None)
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=False,
                      return_dict=True, **kwargs)
        chunk = chunk_tokens(head.weight.shape[0], _SETTINGS.get("loss_chunk", CHUNK_BYTES))
        loss = linear_cross_entropy(out[0], head.weight, labels, chunk, _SETTINGS.get("compile_loss", False))
        return CausalLMOutputWithPast(loss=loss, logits=None)

    model.forward = types.MethodType(forward, model)
    model._fused_loss = True
    return True


_SETTINGS: dict = {}
_REBUILDING: list = []  # True on top while a checkpointed layer runs its forward again (`_second_pass_marked`)


def tile_mlp(model, count: int, tiles: int, compiled: bool = False) -> int:
    """The MLP of each of the first `count` decoder layers (the checkpointed ones, `checkpoint_first`) rebuilt
    and differentiated in `tiles` slices of the tokens, one slice at a time (pipeline key `tile_mlp`, the
    planner's `stages.memory.mlp_tiles`); the number of MLPs tiled.

    A checkpointed layer's backward pass first runs its forward again, and the MLP's activations, three or four
    tensors as wide as the intermediate size (8,192 at 1.8B: 537 MB each at micro-batch 16), are all alive at
    once while its backward runs: most of the training step's peak. The MLP works token by token, so each slice
    of tokens can be rebuilt, differentiated and freed before the next: the same products, half of those
    tensors alive with two slices. In the layer's second forward the MLP only keeps its input (its output's
    value is read by nobody: the backward pass of the residual sum needs none), and the slices run in its
    backward, so the MLP still runs twice forwards as a checkpointed layer's does. `compiled`: each slice through
    torch.compile (the compiled layer stops at the MLP and resumes after it). Only where LoRA has no dropout: a
    slice's second forward would not draw the same masks in its own compiled graph."""
    import torch

    if tiles < 2:
        return 0
    inner = getattr(model, model.base_model_prefix, None)
    tiled = 0
    for layer in list(getattr(inner, "layers", None) or [])[:count]:
        mlp = getattr(layer, "feed_forward", None) or getattr(layer, "mlp", None)
        if mlp is None:
            continue
        own = mlp.forward
        run = torch.compile(own, dynamic=False) if compiled else own
        mlp.forward = torch.compiler.disable(functools.partial(_tiled_mlp, mlp, own, run, tiles))
        tiled += 1
    return tiled


def _tiled_mlp(mlp, own, run, tiles, x):
    import torch

    if not mlp.training:
        return own(x)
    params = [p for p in mlp.parameters() if p.requires_grad]
    if not torch.is_grad_enabled():  # a reentrant checkpoint's first pass: nothing kept, slices cap the peak
        return _by_tiles(run, x, tiles)
    return _tiled_function().apply(run, tiles, bool(_REBUILDING and _REBUILDING[-1]), x, *params)


def _slices(rows: int, tiles: int) -> list:
    step = -(-rows // tiles)
    return [slice(start, start + step) for start in range(0, rows, step)]


def _by_tiles(run, x, tiles):
    import torch

    flat = x.reshape(-1, x.shape[-1])
    with torch.no_grad():
        out = None
        for rows in _slices(flat.shape[0], tiles):
            part = run(flat[rows])
            out = flat.new_empty((flat.shape[0], part.shape[-1]), dtype=part.dtype) if out is None else out
            out[rows] = part
    return out.view(*x.shape[:-1], out.shape[-1])


@functools.cache
def _tiled_function():
    import torch

    class TiledMLP(torch.autograd.Function):
        @staticmethod
        def forward(ctx, run, tiles, rebuilding, x, *params):
            device = x.device.type
            ctx.run, ctx.tiles, ctx.params = run, tiles, params
            ctx.autocast = {"device_type": device, "enabled": torch.is_autocast_enabled(device),
                            "dtype": torch.get_autocast_dtype(device)}
            ctx.save_for_backward(x)
            if rebuilding:  # the layer's second forward: its output's value is never read
                dtype = ctx.autocast["dtype"] if ctx.autocast["enabled"] else x.dtype
                return torch.zeros(x.shape, dtype=dtype, device=x.device)
            return _by_tiles(run, x, tiles)

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            flat, grad = x.detach().reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
            need_x = ctx.needs_input_grad[3]
            grad_x = torch.empty_like(flat) if need_x else None
            sums: list = [None] * len(ctx.params)
            for rows in _slices(flat.shape[0], ctx.tiles):
                part = flat[rows].detach().requires_grad_(need_x)
                with torch.enable_grad(), torch.autocast(**ctx.autocast):
                    out = ctx.run(part)
                got = torch.autograd.grad(out, ([part] if need_x else []) + list(ctx.params), grad[rows],
                                          allow_unused=True)
                if need_x:
                    grad_x[rows], got = got[0], got[1:]
                sums = [g if s is None else (s if g is None else s.add_(g)) for s, g in zip(sums, got)]
                del out, got
            return (None, None, None, None if grad_x is None else grad_x.view_as(x), *sums)

    return TiledMLP


def compile_layers(model, mode: str | None = None) -> int:
    """torch.compile the training forward of every decoder layer; the number compiled.

    mode "reduce-overhead" also replays each layer's forward and backward as CUDA graphs (cudagraph
    trees): a micro-batch costs the host a few replays instead of thousands of launches. Each first
    layer's call marks a new step for the trees, and first gives every trainable weight a gradient
    buffer of its own: backward then adds into it in place, where it would otherwise take the graph's
    output buffer as the gradient, which the next micro-batch's replay overwrites (lost accumulation)."""
    import torch

    layers = getattr(getattr(model, model.base_model_prefix, None), "layers", None) or []
    trainable: list = []

    def new_step() -> None:
        torch.compiler.cudagraph_mark_step_begin()
        if not trainable:
            trainable.extend(p for p in model.parameters() if p.requires_grad)
        for p in trainable:
            if p.grad is None:
                p.grad = torch.zeros_like(p)

    for i, layer in enumerate(layers):
        eager = layer.forward
        compiled = torch.compile(eager, dynamic=False, mode=mode)
        first = i == 0 and mode == "reduce-overhead"

        def forward(*args, _layer=layer, _eager=eager, _compiled=compiled, _first=first, **kwargs):
            if not _layer.training:  # (checkpointing's first pass runs without grad)
                return _eager(*args, **kwargs)
            if _first:
                new_step()
            return _compiled(*args, **kwargs)

        layer.forward = forward
    return len(layers)


def tune_kernels() -> None:
    """`train.tune_kernels`: inductor tunes the kernels it makes for this process's compiled code on this machine.
    Multi-kernel: a row reduction of up to 16k columns also gets a persistent variant, which holds a row in
    registers and reads it once (the default loops over it, reading it once for the maximum and again to scale),
    and the faster of the two is kept, timed at the first call; the float8 scaling's row maxima over 2,048-8,192
    columns are such reductions. Coordinate descent: each kernel's launch settings (block sizes, warps) tuned from
    the heuristic's. Every run tunes anew, in a cache directory of its own, removed at its end (about 3 minutes at
    the 1.8B shape on an H200): on the GPU machine a second run that found the first one's cached graphs and
    tunings stopped 22 s in (2026-12-04; its log did not come back), where the four runs whose graphs were not in
    the cache trained."""
    import atexit
    import os
    import shutil
    import tempfile

    from torch._inductor import config

    config.triton.multi_kernel = 1
    config.coordinate_descent_tuning = True
    if not os.environ.get("PIPELINE_TUNED_CACHE"):
        own = tempfile.mkdtemp(prefix="inductor-tuned-")
        os.environ["PIPELINE_TUNED_CACHE"] = os.environ["TORCHINDUCTOR_CACHE_DIR"] = own
        atexit.register(shutil.rmtree, own, ignore_errors=True)


def full_batches(instances, micro_batch: int, max_length: int | None = None, **kwargs):
    """XTuner's `default_collate_fn`, with every batch `micro_batch` rows (and, for packed data, `max_length`
    tokens), for compiled layers (`train.compile_layers`): they compile for one shape, and the epoch's last,
    short batch made them compile again in the middle of the run (about 13 s at micro-batch 16 on an H200,
    benchmarks/README.md). A row added repeats the first row's tokens with every label ignored (-100), and a
    short pack is padded at its end (pad tokens, labels ignored): the loss is the mean over the same labelled
    tokens, no real token attends to padding (causal attention), and the rows added get no gradient, so the
    step is the short batch's. Nothing changes for a full batch."""
    from xtuner.dataset.collate_fns import default_collate_fn
    from xtuner.utils import DEFAULT_PAD_TOKEN_INDEX

    rows = list(instances)
    if rows and len(rows) < micro_batch:
        blank = {**rows[0], "labels": [IGNORE] * len(rows[0]["labels"])}
        rows += [blank] * (micro_batch - len(rows))
    if max_length:
        pad = kwargs.get("pad_index", DEFAULT_PAD_TOKEN_INDEX)
        rows = [row if len(row["input_ids"]) >= max_length else
                {**row, "input_ids": list(row["input_ids"]) + [pad] * (max_length - len(row["input_ids"])),
                 "labels": list(row["labels"]) + [IGNORE] * (max_length - len(row["labels"]))} for row in rows]
    return default_collate_fn(rows, **kwargs)


def _to_host(tensor):
    """A saved tensor's copy in pinned host memory. On a GPU the copy runs on a stream of its own, beside the
    compute that follows (no wait for the host either): the stream first waits for the work queued so far, which
    makes the tensor, and the allocator keeps the tensor's memory until the copy is done (`record_stream`)."""
    import torch

    host = torch.empty(tensor.size(), dtype=tensor.dtype, pin_memory=tensor.is_cuda)
    if not tensor.is_cuda:
        host.copy_(tensor)
        return tensor.device, host, None
    side = _copy_stream(tensor.device)
    side.wait_stream(torch.cuda.current_stream(tensor.device))
    with torch.cuda.stream(side):
        host.copy_(tensor, non_blocking=True)
        done = side.record_event()
    tensor.record_stream(side)
    return tensor.device, host, done


def _from_host(packed):
    """The tensor back on its device, queued on the current stream once its copy to the host is done."""
    device, host, done = packed
    if done is not None:
        import torch

        torch.cuda.current_stream(device).wait_event(done)
    return host.to(device, non_blocking=host.is_pinned())


@functools.cache
def _copy_stream(device):
    import torch

    return torch.cuda.Stream(device)


def checkpoint_first(model, count: int, offload: bool = False) -> int:
    """Activation checkpointing of the first `count` decoder layers only; the number wrapped.

    A checkpointed layer keeps only its input and runs its forward pass again in the backward pass: a
    third more compute for that layer. Checkpointing every layer lets a large micro-batch fit; none
    is the fastest but needs the most memory; the planner (stages/memory.py) checkpoints as few
    layers as the budget allows. The first ones: the backward pass reaches them last, once the
    others have freed their activations, so rebuilding one never coincides with the others' peak.
    The model's own all-layer checkpointing (which XTuner switches on) is turned off at each forward.
    With `offload`, each checkpointed layer's input waits in host memory (the module's doc)."""
    import torch
    from torch.utils.checkpoint import checkpoint

    inner = getattr(model, model.base_model_prefix, None)
    layers = list(getattr(inner, "layers", None) or [])[:count]
    for layer in layers:
        forward = layer.forward

        def run(*args, _layer=layer, _eager=forward, **kwargs):
            if not (_layer.training and torch.is_grad_enabled()):
                return _eager(*args, **kwargs)
            _forward = _second_pass_marked(_eager)
            if args and torch.is_tensor(args[0]) and args[0].is_floating_point() and args[0].grad_fn is None:
                # the first layer's input, from frozen embeddings, detached: peft's enable_input_require_grads
                # (which XTuner calls) makes it a leaf that asks for a gradient, and autograd then keeps it on
                # the GPU for the whole backward pass to give it a gradient that nobody reads
                args = (args[0].detach(), *args[1:])
            if offload:  # the reentrant form saves the layer's inputs alone, through these hooks
                if not any(torch.is_tensor(a) and a.requires_grad for a in args):
                    # it gives the layer's weights gradients only when an input asks for one: a tensor of no
                    # elements that does, after the others (the layer never sees it)
                    token = torch.empty(0, device=args[0].device, requires_grad=True)
                    body = functools.partial(_without_last, _forward, kwargs)
                    with torch.autograd.graph.saved_tensors_hooks(_to_host, _from_host):
                        return checkpoint(body, *args, token, use_reentrant=True)
                with torch.autograd.graph.saved_tensors_hooks(_to_host, _from_host):
                    return checkpoint(functools.partial(_forward, **kwargs), *args, use_reentrant=True)
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        layer.forward = run
    if layers:
        inner.register_forward_pre_hook(_own_checkpointing_off, with_kwargs=True)
    return len(layers)


def _second_pass_marked(forward):
    """`forward`, with `_REBUILDING` saying, while it runs, whether this is its second call: a checkpointed layer's
    forward again in the backward pass (what `tile_mlp` asks). One per checkpointed call."""
    calls: list = []

    def marked(*args, **kwargs):
        _REBUILDING.append(bool(calls))
        calls.append(True)
        try:
            return forward(*args, **kwargs)
        finally:
            _REBUILDING.pop()

    return marked


def _without_last(forward, kwargs, *args):
    """`forward(*args[:-1], **kwargs)`: a checkpointed layer's body, without the token `checkpoint_first` adds."""
    return forward(*args[:-1], **kwargs)


def _own_checkpointing_off(module, args, kwargs):
    """Before each forward of the decoder stack: its own checkpointing off, and in training no KV cache
    (which a layer's second forward pass would append to again), as the model's own checkpointing does."""
    module.gradient_checkpointing = False
    if module.training:
        kwargs["use_cache"] = False
    return args, kwargs


def static_rope(model, max_length: int) -> int:
    """Switch InternLM2's dynamic NTK rotary embeddings to the plain rotary embedding class of the same
    code where no training position can reach the dynamic branch (`max_length` <= the module's
    `max_position_embeddings`); the number switched. Same `inv_freq`, same cos and sin: the dynamic
    class differs only above that length (where it also overwrites `inv_freq` for good)."""
    switched = 0
    for module in model.modules():
        cls = type(module)
        if cls.__name__ != "InternLM2DynamicNTKScalingRotaryEmbedding" or max_length > module.max_position_embeddings:
            continue
        plain = next((c for c in cls.__mro__[1:] if c.__name__ == "InternLM2RotaryEmbedding"), None)
        if plain is not None:
            module.__class__ = plain
            switched += 1
    return switched


def rope_table(model, max_length: int) -> int:
    """InternLM2's plain rotary embeddings (after `static_rope`) read their cos and sin from a table of the first
    `max_length` positions in training, instead of computing them in every layer; the number switched.

    The remote code computes `cos(position x inv_freq)` and its sine in each layer's forward. Compiled, inductor
    folds them into the kernels that rotate the queries and keys, so every element of every head computes two
    float32 transcendentals, and the backward pass, which recomputes them rather than keep them, does so twice in
    the reduction that scales the gradient for float8 (`train.fp8`). Llama's code in transformers computes them
    once a forward pass, outside the layers. The table holds the same float32 values, made by the same code
    (`cos` and `sin` of the same exact products) for positions 0 to `max_length - 1`, one table for every layer
    (the same `inv_freq`), held as buffers (not saved) by the first rotary module and read through it by the
    others, so that moving the model moves one table; a layer gathers its rows and casts them as the code does: the
    same bits. Where a sequence is longer than the table (so a position may lie outside it) and in eval mode
    (generation, whose positions grow past it), the code's own forward runs."""
    import torch

    if max_length < 1:
        return 0
    switched, holders = 0, {}
    for module in model.modules():
        cls = type(module)
        if cls.__name__ != "InternLM2RotaryEmbedding":
            continue
        key = (module.inv_freq.device, module.dim, module.base, getattr(module, "scaling_factor", 1.0))
        if key not in holders:
            with torch.no_grad():
                pos = torch.arange(max_length, device=module.inv_freq.device)[None]
                probe = torch.empty(0, device=module.inv_freq.device, dtype=torch.float32)
                cos, sin = cls.forward(module, probe, pos)
            module.register_buffer("rope_cos", cos[0].contiguous(), persistent=False)
            module.register_buffer("rope_sin", sin[0].contiguous(), persistent=False)
            holders[key] = module
        module.__class__ = _table_class(cls)
        object.__setattr__(module, "rope_holder", holders[key])  # a plain attribute: not a submodule
        switched += 1
    return switched


@functools.cache
def _table_class(base):
    class RotaryTable(base):
        def forward(self, x, position_ids):
            cos, sin = self.rope_holder.rope_cos, self.rope_holder.rope_sin
            if not self.training or position_ids.shape[-1] > cos.shape[0]:
                return super().forward(x, position_ids)
            return cos[position_ids].to(x.dtype), sin[position_ids].to(x.dtype)

    RotaryTable.__module__ = base.__module__
    return RotaryTable


def use_sdpa(model) -> int:
    """Switch a remote-code model that picks its attention class from `config.attn_implementation`
    (InternLM2's code; the released config.json says `eager`) from the eager class to the SDPA class of
    the same code; the number of modules switched. The SDPA class is a subclass with the same weights
    and the same result; eager attention materialises batch x heads x length^2 scores in float32
    (4.3 GB a layer for 16 x 2048 tokens), SDPA runs a fused kernel and, on packed batches without
    padding, the causal flash kernel. transformers' own models (Llama) are switched by XTuner already."""
    import sys

    config = getattr(model, "config", None)
    if getattr(config, "attn_implementation", None) != "eager":
        return 0
    module = sys.modules.get(type(model).__module__)
    classes = next((v for k, v in vars(module).items() if k.endswith("_ATTENTION_CLASSES") and isinstance(v, dict)),
                   None) if module else None
    if not classes or not {"eager", "sdpa"} <= set(classes):
        return 0
    switched = 0
    for sub in model.modules():
        if type(sub) is classes["eager"]:
            sub.__class__ = classes["sdpa"]
            switched += 1
    if switched:
        config.attn_implementation = "sdpa"
    return switched


def use_gqa(model) -> int:
    """InternLM2's SDPA attention without copying K and V to every query head; the number of modules switched.

    The remote code's SDPA class expands each key and value head to the query heads that share it (`repeat_kv`:
    a copy the size of the queries) before calling SDPA, and SDPA keeps both copies for the backward pass: at
    the 1.8B shape (16 query heads, 8 key-value heads), 268 MB of a checkpointed layer's rebuilt activations at
    micro-batch 16, where the heads themselves are 134 MB. In training without a cache and a mask (packed
    batches: the causal kernel), the subclass made here asks SDPA for grouped-query attention instead
    (`enable_gqa`, as transformers' own SDPA attention does for Llama): the same products, each query head
    against its group's key and value head. Everything else (a cache, a mask, attention weights asked for)
    goes through the remote code's own forward. Same weights, same module names."""
    switched = 0
    for sub in model.modules():
        cls = type(sub)
        if cls.__name__ == "InternLM2SdpaAttention" and getattr(sub, "num_key_value_groups", 1) > 1:
            sub.__class__ = _gqa_class(cls)
            switched += 1
    return switched


@functools.cache
def _gqa_class(base):
    import sys

    import torch

    remote = sys.modules[base.__module__]  # the remote code's own rotary embedding

    class GroupedQuerySdpaAttention(base):
        def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None,
                    output_attentions=False, use_cache=False, cache_position=None, **kwargs):
            if output_attentions or past_key_value is not None or attention_mask is not None:
                return super().forward(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                       past_key_value=past_key_value, output_attentions=output_attentions,
                                       use_cache=use_cache, cache_position=cache_position, **kwargs)
            bsz, q_len, _ = hidden_states.size()
            groups, dim = self.num_key_value_groups, self.head_dim
            # wqkv's output per key-value head: its `groups` query heads, then its key, then its value
            qkv = self.wqkv(hidden_states).view(bsz, q_len, -1, groups + 2, dim)
            query = qkv[..., :groups, :].reshape(bsz, q_len, -1, dim).transpose(1, 2)
            key = qkv[..., -2, :].transpose(1, 2)
            value = qkv[..., -1, :].transpose(1, 2).contiguous()  # its own memory: a view would keep all of wqkv's
            cos, sin = self.rotary_emb(value, position_ids)
            query, key = remote.apply_rotary_pos_emb(query, key, cos, sin)
            out = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=q_len > 1,
                                                                   enable_gqa=True)
            return self.wo(out.transpose(1, 2).reshape(bsz, q_len, self.hidden_size)), None, past_key_value

    GroupedQuerySdpaAttention.__module__ = base.__module__
    return GroupedQuerySdpaAttention


def _frozen_to(model, dtype) -> None:
    for param in model.parameters():
        if not param.requires_grad and param.is_floating_point() and param.dtype != dtype \
                and type(param).__name__ != "Params4bit":
            param.data = param.data.to(dtype)


def apply(pipeline: dict) -> None:
    """Install what the rendered config's `pipeline` block asks for (`fused_loss`, `loss_chunk_mb`,
    `upcast_frozen`, `compute_dtype`, `max_length`, `compile_layers`, `compile_loss`, `gqa`, `rope_table`,
    `cuda_graphs`, `tune_kernels`, `checkpoint_layers`, `offload_activations`, `tile_mlp`, `fp8`, `fp8_keep`,
    `fp8_fast_accum`, `fp8_fast_accum_grad`) into
    XTuner's model building; later calls change the settings."""
    import torch
    from xtuner.model import sft

    _SETTINGS.update(fused_loss=bool(pipeline.get("fused_loss")),
                     loss_chunk=int(pipeline.get("loss_chunk_mb") or CHUNK_BYTES >> 20) << 20,
                     upcast_frozen=bool(pipeline.get("upcast_frozen", True)),
                     compile_layers=bool(pipeline.get("compile_layers")),
                     compile_loss=bool(pipeline.get("compile_loss")),
                     gqa=bool(pipeline.get("gqa")), rope_table=bool(pipeline.get("rope_table")),
                     cuda_graphs=bool(pipeline.get("cuda_graphs")), tune_kernels=bool(pipeline.get("tune_kernels")),
                     checkpoint_layers=int(pipeline.get("checkpoint_layers") or 0),
                     offload=bool(pipeline.get("offload_activations")),
                     tile_mlp=int(pipeline.get("tile_mlp") or 0),
                     fp8=bool(pipeline.get("fp8")), fp8_keep=bool(pipeline.get("fp8_keep", True)),
                     fp8_fast_accum=bool(pipeline.get("fp8_fast_accum")),
                     fp8_fast_accum_grad=bool(pipeline.get("fp8_fast_accum_grad")),
                     max_length=int(pipeline.get("max_length") or 0),
                     dtype=getattr(torch, pipeline.get("compute_dtype") or "float32"))
    if getattr(sft.dispatch_modules, "_pipeline", False):
        return
    dispatch, prepare = sft.dispatch_modules, sft.prepare_model_for_kbit_training

    def dispatch_modules(model, *args, **kwargs):
        result = dispatch(model, *args, **kwargs)
        use_sdpa(model)
        if _SETTINGS.get("gqa"):
            use_gqa(model)
        if _SETTINGS.get("max_length"):
            static_rope(model, _SETTINGS["max_length"])
            if _SETTINGS.get("rope_table"):
                rope_table(model, _SETTINGS["max_length"])
        if _SETTINGS["fused_loss"]:
            install_fused_loss(model)
        if _SETTINGS["fp8"]:
            from stages import fp8
            from stages.errors import fail

            problem = fp8.check_gpu()
            if problem:
                fail(f"train.fp8: true, but this machine's GPU cannot multiply float8: {problem}; set train.fp8: false")
            fp8.install(model, keep=_SETTINGS["fp8_keep"], fast_accum=_SETTINGS["fp8_fast_accum"],
                        fast_accum_grad=_SETTINGS["fp8_fast_accum_grad"])
        if _SETTINGS["tile_mlp"] and _SETTINGS["checkpoint_layers"]:
            tile_mlp(model, _SETTINGS["checkpoint_layers"], _SETTINGS["tile_mlp"], compiled=_SETTINGS["compile_layers"])
        if _SETTINGS["compile_layers"]:
            if _SETTINGS.get("tune_kernels"):
                tune_kernels()
            compile_layers(model, "reduce-overhead" if _SETTINGS["cuda_graphs"] else None)
        if _SETTINGS["checkpoint_layers"]:
            checkpoint_first(model, _SETTINGS["checkpoint_layers"], offload=_SETTINGS["offload"])
        return result

    def prepare_model_for_kbit_training(model, *args, **kwargs):
        model = prepare(model, *args, **kwargs)
        if not _SETTINGS["upcast_frozen"] and _SETTINGS["dtype"] != torch.float32:
            _frozen_to(model, _SETTINGS["dtype"])
        return model

    dispatch_modules._pipeline = True
    sft.dispatch_modules, sft.prepare_model_for_kbit_training = dispatch_modules, prepare_model_for_kbit_training
