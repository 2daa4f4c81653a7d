"""The adapter of every checkpoint the schedule saves, kept apart from XTuner's checkpoints.

XTuner's CheckpointHook writes `iter_N.pth` every `train.save_interval` iterations and keeps the
last `train.save_total_limit` of them, each with its optimizer state (for a 1.8B QLoRA run, 830 MB
of optimizer state beside 139 MB of model state). The select stage scores every checkpoint, so
this hook, listed in the rendered config's `custom_hooks` (the assistant recipe's template), copies
each new checkpoint's adapter weights alone into `models/work/snapshots/iter_N.pth` as soon as it is
saved. The file, with its optimizer state (about 1 GB for the 1.8B model), is not read back: the
weights are the copy the writer thread is saving (stages/background_save.py), written behind it by the
same thread, or, for a checkpoint written in the loop, the model's own as the CheckpointHook has just
saved them; DeepSpeed's checkpoint folder is read (stages/xtuner_api.py `save_adapter`). The train stage then moves them into
its output `models/checkpoints/`. Kept in the work dir first, so a resumed run keeps the snapshots
of the iterations before the interruption. Process 0 alone writes them.
"""
from __future__ import annotations

from pathlib import Path

from mmengine.hooks import Hook

from stages import background_save


class AdapterSnapshots(Hook):
    priority = "LOWEST"  # after the CheckpointHook (VERY_LOW) has written this iteration's checkpoint

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if runner.rank != 0:
            return
        ckpt = Path(runner.work_dir) / f"iter_{runner.iter + 1}.pth"
        out = self.folder / ckpt.name
        # `pending` before `exists`: a write finishes (renamed, then done) between the two, and asked the other
        # way round a checkpoint renamed just after `exists` looked absent and lost its snapshot
        if out.exists() or not (background_save.pending(ckpt) or ckpt.exists()):
            return  # no checkpoint this iteration
        from stages.xtuner_api import adapter_file, save_adapter, save_weights

        if ckpt.is_dir():  # DeepSpeed's checkpoint folder
            save_adapter(ckpt, out)
            return
        weights = background_save.saved_weights(ckpt)
        if weights is not None:  # the copy the writer thread is saving: its snapshot queued behind it
            out.parent.mkdir(parents=True, exist_ok=True)
            background_save.write(adapter_file(weights), out)
            return
        from mmengine.model import is_model_wrapper
        from mmengine.runner.checkpoint import weights_to_cpu

        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        save_weights(weights_to_cpu(model.state_dict()), out)  # what Runner.save_checkpoint wrote
