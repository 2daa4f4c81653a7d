"""The train stage's own iterations under torch's profiler: an mmengine hook that a benchmark adds to the
rendered config (`benchmarks/speed.sh profile`), so that what XTuner's loop, its hooks and its data
loading add to the model's work shows beside `levers.py`'s profile of the bare model.

It profiles iterations START .. START + COUNT - 1 (env STAGE_PROFILE_START, default 20, and
STAGE_PROFILE_COUNT, default 4; an mmengine iteration is one micro-batch), from the host's side too:
the wall time of those iterations between two synchronisations, the GPU's busy time in them by kind of
kernel, and the host's time outside the model's forward and backward (data loading, collation, hooks,
the optimizer wrapper). One JSON line is appended to STAGE_PROFILE_OUT (a .jsonl) and the kernel table
written beside it (.txt).

With STAGE_PROFILE_BARE=N, before those iterations: N steps of the bare model in the same process, on
the batch of iteration START (the stage's data preprocessor, its optimizer wrapper's autocast, forward
with the loss and backward, no optimizer step; the gradients put back after), timed and two of them
profiled: a second line and table (.bare.txt); their random draws move the run's later dropout masks, so
such a run is a measurement, not one to keep. Beside the stage's own iterations it says whether the
host's extra cost per op comes with the process (then the bare steps are as slow) or with mmengine's loop
around the step (then they are as fast as levers.py's).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from mmengine.hooks import Hook


class StageProfile(Hook):
    priority = "VERY_LOW"

    def __init__(self) -> None:
        self.start = int(os.environ.get("STAGE_PROFILE_START", 20))
        self.count = int(os.environ.get("STAGE_PROFILE_COUNT", 4))
        self.out = Path(os.environ.get("STAGE_PROFILE_OUT", "stage-profile.jsonl"))
        self.prof = None
        self.t0 = 0.0
        self.iter_starts: list[float] = []
        self.iter_ends: list[float] = []

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        if runner.iter == self.start and int(os.environ.get("STAGE_PROFILE_BARE", 0)) > 0:
            self.bare(runner, data_batch, int(os.environ["STAGE_PROFILE_BARE"]))
        if runner.iter == self.start:
            sync()
            self.prof = profiler()
            self.prof.__enter__()
            self.t0 = time.perf_counter()
        if self.prof is not None:
            self.iter_starts.append(time.perf_counter())

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if self.prof is None:
            return
        self.iter_ends.append(time.perf_counter())
        if runner.iter + 1 < self.start + self.count:
            return
        sync()
        wall = time.perf_counter() - self.t0
        self.prof.__exit__(None, None, None)
        from benchmarks.levers import summarize

        summary = summarize(self.prof, wall, self.count, self.out.with_suffix(".txt"))
        # the host's time between one iteration's end and the next one's start: the data loader's
        # next batch and the loop's bookkeeping (the hooks before and after an iteration are inside)
        between = [b - a for a, b in zip(self.iter_ends, self.iter_starts[1:])]
        summary["between_iterations_ms"] = round(sum(between) / max(1, len(between)) * 1e3, 1)
        summary["iterations"], summary["first_iteration"] = self.count, self.start
        self.record(os.environ.get("STAGE_PROFILE_NAME", "train stage profile"), summary)
        self.prof = None

    def bare(self, runner, data_batch, steps: int) -> None:
        from benchmarks.levers import summarize

        model = getattr(runner.model, "module", runner.model)
        data = model.data_preprocessor(data_batch, True)
        params = [p for p in model.parameters() if p.requires_grad]
        kept = [p.grad for p in params]

        def step() -> None:
            with runner.optim_wrapper.optim_context(model):
                loss = model(**data, mode="loss")["loss"]
            loss.backward()

        step()
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        timed = (time.perf_counter() - start) / steps
        with profiler() as prof:
            start = time.perf_counter()
            for _ in range(2):
                step()
            sync()
            wall = time.perf_counter() - start
        for p, grad in zip(params, kept):
            p.grad = grad
        summary = summarize(prof, wall, 2, self.out.with_suffix(".bare.txt"))
        summary["timed_step_ms"] = round(timed * 1e3, 1)
        summary["timed_steps"] = steps
        self.record("the bare step in the train stage's process", summary)

    def record(self, run: str, summary: dict) -> None:
        """One line appended to STAGE_PROFILE_OUT, and on the terminal."""
        self.out.parent.mkdir(parents=True, exist_ok=True)
        with open(self.out, "a", encoding="utf-8") as f:
            f.write(json.dumps({"run": run, **summary}) + "\n")
        print(f"[profile] {run}: {json.dumps(summary)}", flush=True)


def profiler():
    """torch's profiler over the host and, where there is one, the GPU."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else []))


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
