"""A quiet terminal: one progress bar per long stage, the stages' own summary lines, no library noise.

What the libraries print goes to files instead, and the stage prints where:

  DeepSpeed   its accelerator notices ("Setting ds_accelerator to cpu (auto detect)"), printed by every
              process that imports it, are dropped; its other notices below WARNING go to the
              trainer's log file while one is open, else are dropped (stages/errors.py
              `silence_deepspeed`, set by every stage's entry point before anything imports DeepSpeed)
  mmengine    the trainer's environment, config and per-step lines (about 600 lines before the first
              step) go to its log file only (models/work/<run>/<run>.log; the train stage copies it
              into reports/train/xtuner.log); errors still reach the terminal
  warnings    Python warnings raised while training go to that file too

`PIPELINE_VERBOSE=1` in the environment keeps everything on the terminal, as the libraries print it.
The progress bar (`ProgressHook`, registered on every mmengine runner the stage builds) shows the
step, loss, tokens/s and the time left, on standard error, on process 0 only, on a terminal; into a
file or pipe the train stage prints a plain progress line a minute instead, and the other bars nothing.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from typing import Iterator

from stages.errors import DEEPSPEED_LOG as _log_file  # the open trainer log's handler, while one is open
from stages.errors import verbose


def progress_bar(total: int, desc: str, unit: str = "it", initial: int = 0, disable: bool = False):
    """tqdm on standard error, on a terminal only: into a file or a pipe (a log, a test) it draws
    nothing, so an error after it is still the only line there (the train stage's hook prints
    plain progress lines instead)."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                mininterval=0.5, leave=True, disable=disable or not sys.stderr.isatty(), smoothing=0.1)


def _progress_hook_class():
    from mmengine.hooks import Hook

    class ProgressHook(Hook):
        """step / total, loss, tokens/s and the time left, after every training iteration: a bar on a
        terminal; elsewhere a plain line a minute and one at the end, on process 0."""

        priority = "LOWEST"
        EVERY_S = 60

        def __init__(self, desc: str = "[train]") -> None:
            self.desc, self.bar = desc, None

        def before_train(self, runner) -> None:
            self.bar = progress_bar(runner.max_iters, self.desc, initial=runner.iter, disable=runner.rank != 0)
            self.lines = runner.rank == 0 and self.bar.disable and not sys.stderr.isatty()
            self.start = self.last = time.time()

        def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
            if self.bar is None:
                return
            shown = {}
            loss = (outputs or {}).get("loss")
            if loss is not None:
                shown["loss"] = f"{float(loss.detach() if hasattr(loss, 'detach') else loss):.4f}"
            hub = runner.message_hub
            for key in ("train/tokens_per_sec_run", "train/tokens_per_sec"):  # the run's (stages/throughput.py),
                if key in hub.log_scalars:  # or in its first logging interval the iteration's
                    shown["tokens/s"] = f"{hub.get_scalar(key).current():,.0f}"
                    break
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(1)
            step, now = runner.iter + 1, time.time()
            if self.lines and (now - self.last >= self.EVERY_S or step == runner.max_iters):
                self.last = now
                said = "".join(f", {k} {v}" for k, v in shown.items())
                print(f"{self.desc} step {step}/{runner.max_iters}{said}, {now - self.start:.0f} s", flush=True)

        def after_train(self, runner) -> None:
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return ProgressHook


@contextlib.contextmanager
def quiet_trainer(desc: str = "[train]") -> Iterator[None]:
    """While XTuner's trainer runs in this process: mmengine's console output raised to errors only
    (its log file keeps everything), warnings into that file, and a progress bar on every runner."""
    if verbose():
        yield
        return
    from mmengine.runner import Runner

    from stages.xtuner_api import mmengine_errors_only

    train = Runner.train
    hook = _progress_hook_class()

    def opened(handler: logging.FileHandler) -> None:
        _log_file[:] = [handler]
        print(f"{desc} XTuner's log: {os.path.relpath(handler.baseFilename)}", flush=True)

    def train_with_progress(self, *args, **kwargs):
        self.register_hook(hook(desc))
        return train(self, *args, **kwargs)

    import datasets
    import transformers

    bars, level = datasets.is_progress_bar_enabled(), transformers.logging.get_verbosity()
    datasets.disable_progress_bars()  # XTuner's dataset map/filter bars: the stage prints the data's figures
    transformers.logging.set_verbosity_error()
    warnings_log = logging.getLogger("py.warnings")
    forward = _ForwardToLog()
    Runner.train = train_with_progress
    logging.captureWarnings(True)
    warnings_log.addHandler(forward)
    warnings_log.propagate = False
    try:
        with mmengine_errors_only(opened):
            yield
    finally:
        Runner.train = train
        logging.captureWarnings(False)
        warnings_log.removeHandler(forward)
        warnings_log.propagate = True
        _log_file.clear()
        transformers.logging.set_verbosity(level)
        if bars:
            datasets.enable_progress_bars()


class _ForwardToLog(logging.Handler):
    """A record to the open trainer log (dropped when none is open)."""

    def emit(self, record: logging.LogRecord) -> None:
        if _log_file:
            _log_file[0].handle(record)
