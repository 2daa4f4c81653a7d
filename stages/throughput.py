"""The run's tokens/s: every token trained over every second it took, after the first logging interval.

XTuner's `ThroughputHook` gives one iteration's figure (that iteration's tokens over its time), and the
log keeps the one of each logged iteration. Such a sample is noisy, and it is biased wherever the work of
several iterations is settled in one: with the host running ahead of the GPU (CUDA graphs, no waits at an
iteration's end, stages/overlap.py), the iteration that reads the GPU's results waits for all of them,
and the logged iterations are those. `RunThroughput` sums the tokens XTuner's hook counted and mmengine's
iteration times (the timer's `train/time`: consecutive iterations' times add up to the wall clock, the
hooks and the loop included) from the end of the first logging interval, which holds the start-up
(torch.compile, CUDA graph recording), and logs the quotient as `train/tokens_per_sec_run`: the train
stage's summary takes the last logged one (stages/train_log.py).
"""
from __future__ import annotations

from mmengine.hooks import Hook


class RunThroughput(Hook):
    priority = 57  # after mmengine's timer (NORMAL, 50) and XTuner's ThroughputHook (55), before the
    # LoggerHook (BELOW_NORMAL, 60) writes the iteration's scalars

    def __init__(self, skip: int = 0) -> None:
        self.skip, self.first = skip, 0
        self.tokens = self.seconds = 0.0

    def before_train(self, runner) -> None:
        self.first = runner.iter + self.skip  # a resumed run counts from where it resumed
        self.tokens = self.seconds = 0.0

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        hub = runner.message_hub
        if runner.iter < self.first or "train/tokens_per_sec" not in hub.log_scalars:
            return
        seconds = hub.get_scalar("train/time").current()
        self.tokens += hub.get_scalar("train/tokens_per_sec").current() * (seconds + 1e-12)  # XTuner's count
        self.seconds += seconds
        if self.seconds > 0:
            hub.update_scalar("train/tokens_per_sec_run", self.tokens / self.seconds)
