"""The train stage's host and GPU working side by side: no wait for the GPU at the end of an iteration.

mmengine's loop reads the GPU's results on the host several times an iteration, and each read waits
until the GPU has run everything queued so far: the batch's copies to the GPU (from pageable memory),
InternLM2's check that the attention mask is all ones, the loss for the message hub and the progress
bar (`.item()`), and the gradient norm after clipping (`float()`). After such a wait the GPU idles
while the host does the loop's own work (the next batch, the hooks, model.train()): on one H200, at
the 1.8B default (micro-batch 4), 12 ms of loop and 20 ms of hooks in a 185 ms iteration
(benchmarks/README.md, "Where the stage's step goes").

`Overlap` (a hook the assistant recipe's template adds with `train.cuda_graphs`, on one CUDA process without
DeepSpeed, whether layers are checkpointed or not: the pipeline key `overlap`) takes those waits out, the
results and the logs unchanged:

  batches      the loader pins them (`pin_memory=True` in the rendered config) and the data
               preprocessor copies them without blocking; an attention mask that is all ones (packed
               data, no padding) is dropped on the host, which is what the model's own check decides
               on the GPU (SDPA's causal kernel either way)
  the loss     read once, right after the forward pass, when the GPU's queue holds nothing else: the
               host then queues the backward pass and the loop's work overlaps with it; the message
               hub and the progress bar get numbers, not tensors
  grad norm    kept as a tensor when clipping, handed to the message hub after the next forward pass
               (finished by then), or before the logger writes an iteration that needs it

Only the timing changes: the same numbers reach the same message hub keys in the same order.

Measured on one H200 at the 1.8B default (micro-batch 4, benchmarks/README.md): with CUDA graphs it takes
the iteration from 172 to 163 ms (47.5k -> 50.2k tokens/s); graphs alone changed nothing measurable. In
Unsloth's regime (micro-batch 16, every layer checkpointed and offloaded, no CUDA graphs) alone: 0.740 to
0.722 s an iteration, the same loss. The
iterations that settle the deferred work are the logged ones, so XTuner's per-iteration figure there
reads low: the stage's tokens/s is the run's (stages/throughput.py).
"""
from __future__ import annotations

from collections import OrderedDict

from mmengine.hooks import Hook


class Overlap(Hook):
    priority = "ABOVE_NORMAL"  # before the LoggerHook (BELOW_NORMAL) writes an iteration's scalars

    def __init__(self) -> None:
        self.pending: list = []  # grad norms (tensors) not yet in the message hub
        self.log_interval = 0
        self.hub = None

    def before_train(self, runner) -> None:
        model = getattr(runner.model, "module", runner.model)
        self.hub = runner.message_hub
        self.log_interval = next((h.interval for h in runner.hooks if type(h).__name__ == "LoggerHook"), 0)
        preprocessor = getattr(model, "data_preprocessor", None)
        if preprocessor is not None and hasattr(preprocessor, "_non_blocking"):
            preprocessor._non_blocking = True
            cast = preprocessor.forward

            def forward(data, training=False, _cast=cast):
                return _cast(without_full_mask(data), training)

            preprocessor.forward = forward
        parse = model.parse_losses

        def parse_losses(losses, _parse=parse):
            loss, log_vars = _parse(losses)
            return loss, self.read(log_vars)

        model.parse_losses = parse_losses
        wrapper = runner.optim_wrapper
        if callable(getattr(wrapper, "clip_func", None)) and getattr(wrapper, "grad_name", "") == "grad_norm":
            clip = wrapper.clip_func

            def clip_func(params, _clip=clip, **kwargs):
                self.pending.append(_clip(params, **kwargs))
                return None  # mmengine's float() of it would wait for the GPU

            wrapper.clip_func = clip_func

    def read(self, log_vars: OrderedDict) -> OrderedDict:
        """The loss values as numbers, in one read; the grad norms pending before it as well."""
        import torch

        keys = [k for k, v in log_vars.items() if isinstance(v, torch.Tensor)]
        if keys:
            numbers = dict(zip(keys, torch.stack([log_vars[k].detach().float().reshape(()) for k in keys]).tolist()))
            log_vars = OrderedDict((k, numbers.get(k, v)) for k, v in log_vars.items())
        self.flush()
        return log_vars

    def flush(self) -> None:
        for norm in self.pending:
            self.hub.update_scalar("train/grad_norm", float(norm))
        self.pending.clear()

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        step = runner.iter + 1
        if self.pending and (step == runner.max_iters or (self.log_interval and step % self.log_interval == 0)):
            self.flush()

    def after_train(self, runner) -> None:
        self.flush()


def without_full_mask(data):
    """The batch without its attention mask where the mask is a host tensor of ones only."""
    import torch

    inner = data.get("data") if isinstance(data, dict) else None
    mask = inner.get("attention_mask") if isinstance(inner, dict) else None
    if isinstance(mask, torch.Tensor) and mask.device.type == "cpu" and bool(mask.all()):
        data = {**data, "data": {**inner, "attention_mask": None}}
    return data
