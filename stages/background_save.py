"""XTuner's checkpoints written to disk while training goes on.

mmengine's CheckpointHook saves `iter_N.pth` every `train.save_interval` iterations: the adapter, its
AdamW state and the loop's state, about 1 GB for InternLM2-1.8B with LoRA r 64. mmengine serialises it
into memory and writes it in the training loop's thread, so the loop stops for it: on one H200 at the
1.8B default, 2.3 s a checkpoint on average, 19 s of a 71 s, 160-iteration run with 8 checkpoints; 1.2 s
with this hook (benchmarks/README.md, "Checkpoints written by a thread").

`BackgroundCheckpoints` (a hook in every recipe's rendered config) takes the write out of the loop. At each save the
loop copies the checkpoint (its tensors are on the CPU by then; the copy keeps the file's contents those
of that iteration, whatever the next steps change), and one thread writes the copy under a temporary
name and renames it into place: a checkpoint file is whole or absent. The next save waits for the one
before it, and the end of training waits for the last, so the train stage reads finished files. A run
killed between a save and its rename resumes from the newest whole checkpoint (stages/train.py
`prepare_work_dir`). Not for DeepSpeed's checkpoints (its engine writes those).
"""
from __future__ import annotations

import copy
import os
import threading
from pathlib import Path

from mmengine.hooks import Hook

_LOCK = threading.Lock()
_PENDING: dict[str, _Write] = {}  # path -> the thread writing it


class _Write(threading.Thread):
    """`checkpoint` written to `path.part`, then renamed to `path`; an error kept for `wait()` to raise."""

    def __init__(self, checkpoint: dict, path: str) -> None:
        super().__init__(name=f"save {Path(path).name}", daemon=False)  # the interpreter waits for it at exit
        self.checkpoint, self.path, self.error = checkpoint, path, None

    def run(self) -> None:
        import torch

        tmp = Path(f"{self.path}.part")
        try:
            torch.save(self.checkpoint, tmp)
            os.replace(tmp, self.path)
        except BaseException as err:  # raised again in the training thread, by wait()
            self.error = err
            tmp.unlink(missing_ok=True)
        finally:
            self.checkpoint = None


def pending(path: str | Path) -> bool:
    """Whether `path` is being written by a thread of this module."""
    with _LOCK:
        thread = _PENDING.get(str(path))
    return thread is not None and thread.is_alive()


def wait() -> None:
    """Every write started here finished (its error, if one failed, raised here)."""
    with _LOCK:
        threads = list(_PENDING.values())
    for thread in threads:
        thread.join()
    with _LOCK:
        for key in [k for k, t in _PENDING.items() if not t.is_alive()]:
            del _PENDING[key]
    failed = [t.error for t in threads if t.error is not None]
    if failed:
        raise failed[0]


def save_in_background(checkpoint: dict, filename, file_client_args=None, backend_args=None) -> None:
    """mmengine.runner.checkpoint.save_checkpoint's signature: a local file written by a thread; any other
    destination as mmengine writes it."""
    from mmengine.runner import checkpoint as mm

    if file_client_args is not None or backend_args is not None or "://" in str(filename):
        mm.save_checkpoint(checkpoint, filename, file_client_args=file_client_args, backend_args=backend_args)
        return
    wait()  # one write at a time: the previous checkpoint is on disk before this one starts
    thread = _Write(copy.deepcopy(checkpoint), str(filename))
    with _LOCK:
        _PENDING[str(filename)] = thread
    thread.start()


class BackgroundCheckpoints(Hook):
    priority = "VERY_HIGH"  # installed before any other hook can save

    def before_train(self, runner) -> None:
        import mmengine.runner.runner as module

        self._saved = module.save_checkpoint
        module.save_checkpoint = save_in_background

    def after_train(self, runner) -> None:  # after the last iteration's save (the CheckpointHook's save_last)
        import mmengine.runner.runner as module

        try:
            wait()
        finally:
            module.save_checkpoint = self._saved
