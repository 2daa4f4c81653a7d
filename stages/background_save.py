"""XTuner's checkpoints written to disk while training goes on.

mmengine's CheckpointHook saves `iter_N.pth` every `train.save_interval` iterations: the adapter, its
AdamW state and the loop's state, about 1 GB for InternLM2-1.8B with LoRA r 64. mmengine serialises it
into memory and writes it in the training loop's thread, so the loop stops for it: on one H200 at the
1.8B default, 2.3 s a checkpoint on average, 19 s of a 71 s, 160-iteration run with 8 checkpoints; 1.2 s
with this hook (benchmarks/README.md, "Checkpoints written by a thread").

`BackgroundCheckpoints` (a hook in every recipe's rendered config) takes the write out of the loop. At
each save the loop copies the checkpoint (its tensors are on the CPU by then; the copy keeps the file's
contents those of that iteration, whatever the next steps change), and one writer thread writes the copy
under a temporary name and renames it into place: a file is whole or absent. The adapter snapshot of
the same iteration (stages/snapshots.py) is the copy's model weights, queued behind it. A save waits for
the writes before it, so at most one checkpoint is in memory twice; the end of training waits for all,
so the train stage reads finished files. A run killed between a save and its rename resumes from the
newest whole checkpoint (stages/train.py `prepare_work_dir`). Not for DeepSpeed's checkpoints (its
engine writes those).
"""
from __future__ import annotations

import copy
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from mmengine.hooks import Hook

_LOCK = threading.Lock()
_WRITER: list[ThreadPoolExecutor] = []  # one thread, made at the first write; the interpreter waits for it at exit
_FUTURES: dict[str, Future] = {}  # path -> its write, queued or running
_LAST: dict[str, dict] = {}  # the last checkpoint's path -> its copy's model weights


def _write_file(obj, path: str) -> None:
    from stages.io import write_torch

    write_torch(Path(path), obj)


def write(obj, path: str | Path) -> None:
    """`obj` (nothing else holds it) written to `path` by the writer thread, after the writes queued before."""
    with _LOCK:
        if not _WRITER:
            _WRITER.append(ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer"))
        _FUTURES[str(path)] = _WRITER[0].submit(_write_file, obj, str(path))


def pending(path: str | Path) -> bool:
    """Whether `path` is queued or being written here."""
    with _LOCK:
        future = _FUTURES.get(str(path))
    return future is not None and not future.done()


def saved_weights(path: str | Path) -> dict | None:
    """The model weights of the checkpoint last saved here, when that was `path` (the copy being written)."""
    with _LOCK:
        return _LAST.get(str(path))


def wait() -> None:
    """Every write queued here finished (the first error, if one failed, raised here)."""
    with _LOCK:
        futures = list(_FUTURES.values())
    errors = [f.exception() for f in futures]  # each waits for its write
    with _LOCK:
        for key in [k for k, f in _FUTURES.items() if f.done()]:
            del _FUTURES[key]
    failed = [e for e in errors if e is not None]
    if failed:
        raise failed[0]


def save_in_background(checkpoint: dict, filename, file_client_args=None, backend_args=None) -> None:
    """mmengine.runner.checkpoint.save_checkpoint's signature: a local file written by the writer thread; any
    other destination as mmengine writes it."""
    from mmengine.runner import checkpoint as mm

    if file_client_args is not None or backend_args is not None or "://" in str(filename):
        mm.save_checkpoint(checkpoint, filename, file_client_args=file_client_args, backend_args=backend_args)
        return
    wait()  # the checkpoint before this one, and its snapshot, are on disk
    copied = copy.deepcopy(checkpoint)
    with _LOCK:
        _LAST.clear()
        _LAST[str(filename)] = copied.get("state_dict")
    write(copied, filename)


class BackgroundCheckpoints(Hook):
    priority = "VERY_HIGH"  # installed before any other hook can save

    def before_train(self, runner) -> None:
        import mmengine.runner.runner as module

        module.save_checkpoint = save_in_background  # the name Runner.save_checkpoint calls

    def after_train(self, runner) -> None:  # after the last iteration's save (the CheckpointHook's save_last)
        import mmengine.runner.checkpoint as original
        import mmengine.runner.runner as module

        try:
            wait()
        finally:  # mmengine's own again (a run that raised keeps this one, which writes the same files)
            module.save_checkpoint = original.save_checkpoint
            with _LOCK:
                _LAST.clear()
