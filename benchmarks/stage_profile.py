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
the batch of iteration START, forward with the loss and backward, no optimizer step (the gradients put
back after), timed and two of them profiled, called two ways: as the loop calls it (the stage's data
preprocessor, its optimizer wrapper's autocast, forward in mode "loss") and as levers.py calls it
(torch's autocast, the model's compute_loss). A line and a table each (.bare-loop.txt, .bare-levers.txt);
their random draws move the run's later dropout masks, so such a run is a measurement, not one to keep.
Beside the stage's own iterations they say whether the host's extra cost per op comes with the process
(then the bare steps are as slow), with the way the step is called, or with mmengine's loop around it.
Every table has a host-sorted twin (.host.txt): the ops with the most self CPU time.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from mmengine.hooks import Hook

from benchmarks.levers import profile, profiler, summarize, sync


MARKS: dict[str, dict[int, float]] = {"first before": {}, "last before": {}, "first after": {}, "last after": {},
                                     "data": {}}


class StageEdges(Hook):
    """The first of the hooks before and after each iteration: with StageProfile, the last, it splits the
    unprofiled iterations before START into the loop's own work (model.train(), the next batch, the
    progress bar's line), the hooks before, the train step (data preprocessor, forward, backward, the
    optimizer wrapper's update) and the hooks after (`phases_ms` of the profile's line)."""

    priority = "HIGHEST"

    def before_train(self, runner) -> None:
        from mmengine.runner import loops

        kind = type(runner.train_loop.dataloader_iterator)
        if kind is loops._InfiniteDataloaderIterator and not hasattr(kind, "_timed"):
            fetch = kind.__next__

            def timed(self_):
                start = time.perf_counter()
                try:
                    return fetch(self_)
                finally:
                    MARKS["data"][runner.iter] = time.perf_counter() - start

            kind.__next__, kind._timed = timed, True

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        MARKS["first before"][runner.iter] = time.perf_counter()

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        MARKS["first after"][runner.iter] = time.perf_counter()


def phases(first: int, last: int) -> dict:
    """Mean milliseconds of each part of iterations first+1 .. last-1 (MARKS)."""
    m, its = MARKS, range(first + 1, last)
    parts = {
        "iteration": [m["last after"][i] - m["last after"][i - 1] for i in its],
        "loop (model.train, next batch, progress bar)": [m["first before"][i] - m["last after"][i - 1] for i in its],
        "of which the next batch": [m["data"].get(i, 0.0) for i in its],
        "hooks before": [m["last before"][i] - m["first before"][i] for i in its],
        "train step": [m["first after"][i] - m["last before"][i] for i in its],
        "hooks after": [m["last after"][i] - m["first after"][i] for i in its],
    }
    return {k: round(sum(v) / max(1, len(v)) * 1e3, 2) for k, v in parts.items()}


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
        MARKS["last before"][runner.iter] = time.perf_counter()
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
        MARKS["last after"][runner.iter] = time.perf_counter()
        if self.prof is None:
            return
        self.iter_ends.append(time.perf_counter())
        if runner.iter + 1 < self.start + self.count:
            return
        sync()
        wall = time.perf_counter() - self.t0
        self.prof.__exit__(None, None, None)
        summary = summarize(self.prof, wall, self.count, self.out.with_suffix(".txt"))
        # the host's time between one iteration's end and the next one's start: the data loader's
        # next batch and the loop's bookkeeping (the hooks before and after an iteration are inside)
        between = [b - a for a, b in zip(self.iter_ends, self.iter_starts[1:])]
        summary["between_iterations_ms"] = round(sum(between) / max(1, len(between)) * 1e3, 1)
        summary["iterations"], summary["first_iteration"] = self.count, self.start
        summary["phases_ms"] = phases(max(0, self.start - 15), self.start)  # unprofiled, before the bare steps
        self.record(os.environ.get("STAGE_PROFILE_NAME", "train stage profile"), summary)
        self.prof = None

    def bare(self, runner, data_batch, steps: int) -> None:
        """`steps` timed and two profiled steps of the bare model, twice: as the stage's loop calls it (its
        data preprocessor, its optimizer wrapper's context, forward in mode "loss") and as levers.py does
        (torch's autocast around the model's compute_loss); backward in both, no optimizer step."""
        import torch

        model = getattr(runner.model, "module", runner.model)
        data = model.data_preprocessor(data_batch, True)
        params = [p for p in model.parameters() if p.requires_grad]
        kept = [p.grad for p in params]

        def as_the_loop() -> None:
            with runner.optim_wrapper.optim_context(model):
                loss = model(**model.data_preprocessor(data_batch, True), mode="loss")["loss"]
            loss.backward()

        def as_levers() -> None:
            with torch.autocast(params[0].device.type, dtype=torch.bfloat16):
                loss = model.compute_loss(data["data"])["loss"]
            loss.backward()

        for tag, name, step in (("loop", "as the loop calls it", as_the_loop),
                                ("levers", "as levers.py calls it", as_levers)):
            step()
            sync()
            start = time.perf_counter()
            for _ in range(steps):
                step()
            sync()
            timed_ms = round((time.perf_counter() - start) / steps * 1e3, 1)
            summary = profile(step, self.out.with_name(f"{self.out.stem}.bare-{tag}.txt"))
            summary["timed_step_ms"] = timed_ms
            summary["timed_steps"] = steps
            self.record(f"the bare step in the train stage's process, {name}", summary)
        for p, grad in zip(params, kept):
            p.grad = grad

    def record(self, run: str, summary: dict) -> None:
        """One line appended to STAGE_PROFILE_OUT, and on the terminal."""
        self.out.parent.mkdir(parents=True, exist_ok=True)
        with open(self.out, "a", encoding="utf-8") as f:
            f.write(json.dumps({"run": run, **summary}) + "\n")
        print(f"[profile] {run}: {json.dumps(summary)}", flush=True)
