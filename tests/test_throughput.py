"""stages/throughput.py on mmengine's own runner (a small model on the CPU): the run's tokens/s is the
tokens counted after the first logging interval over the wall-clock time they took, even when one
iteration settles the others' work (as the logged iterations do with the host ahead of the GPU), where
the logged iterations' own figures are not."""
from __future__ import annotations

import json
import time

import pytest
import torch

from stages.xtuner_api import patch_stack  # noqa: E402

patch_stack()

from mmengine.hooks import Hook  # noqa: E402
from mmengine.model import BaseModel  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

from stages.throughput import RunThroughput  # noqa: E402
from stages.train_log import summarize  # noqa: E402

TOKENS = 2 * 8  # a batch: 2 sequences of 8 tokens


class Toy(BaseModel):
    def __init__(self, slow: set) -> None:
        super().__init__()
        self.net, self.slow, self.calls = torch.nn.Linear(8, 1), slow, 0

    def forward(self, data, data_samples=None, mode="loss"):
        self.calls += 1
        time.sleep(0.25 if self.calls in self.slow else 0.01)  # a logged iteration waiting for the others' work
        return {"loss": self.net(data["x"].float()).pow(2).mean()}


class Batches(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict:
        return {"x": torch.full((8,), float(i % 5))}


class Count(Hook):
    """XTuner's ThroughputHook's figure: the batch's tokens over this iteration's time (its FLOPs, which
    need a language model's config, left out), at its priority."""

    priority = 55

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        seconds = runner.message_hub.get_scalar("train/time").current()
        runner.message_hub.update_scalar("train/tokens_per_sec", TOKENS / (seconds + 1e-12))


class Clock(Hook):
    priority = "LOWEST"

    def __init__(self) -> None:
        self.at: dict = {}

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        self.at[runner.iter + 1] = time.perf_counter()


def train(work, slow: set) -> tuple[list, dict]:
    from stages.quiet import _progress_hook_class

    clock = Clock()
    runner = Runner(
        model=Toy(slow), work_dir=str(work), experiment_name=f"throughput-{work.name}",
        train_dataloader=dict(dataset=Batches(), batch_size=2, collate_fn=lambda b: {"data": {
            "x": torch.stack([it["x"] for it in b])}}, sampler=dict(type="DefaultSampler", shuffle=False)),
        optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.01)),
        train_cfg=dict(by_epoch=False, max_iters=12), custom_hooks=[dict(type=Count), dict(type=RunThroughput, skip=4)],
        default_hooks=dict(logger=dict(type="LoggerHook", interval=4), checkpoint=None),
        log_processor=dict(by_epoch=False), default_scope="mmengine")
    runner.register_hook(clock)
    runner.register_hook(_progress_hook_class()("[train]"))  # the stage's progress line, as in a log file
    runner.train()
    scalars = [json.loads(line) for line in next(work.glob("*/vis_data/scalars.json")).read_text().splitlines()]
    return scalars, clock.at


def test_the_run_figure_is_the_tokens_over_the_wall_clock_after_the_first_interval(tmp_path, capsys):
    scalars, at = train(tmp_path / "slow", slow={8, 12})  # the logged iterations settle up
    assert [r["step"] for r in scalars] == [4, 8, 12] and "tokens_per_sec_run" not in scalars[0]
    wall = at[12] - at[4]  # iterations 5-12, start-up (the first interval) left out
    run = scalars[-1]["tokens_per_sec_run"]
    assert run == pytest.approx(8 * TOKENS / wall, rel=0.05)
    sampled = sum(r["tokens_per_sec"] for r in scalars[1:]) / 2  # what the summary took before
    assert sampled < 0.6 * run  # the logged iterations' own figures say the run is slower than it was
    assert f"tokens/s {run:,.0f}, " in capsys.readouterr().out.splitlines()[-1]  # the progress line: the run's
    steps = {r["step"]: {"tokens_per_sec": r["tokens_per_sec"], **({"tokens_per_sec_run": r["tokens_per_sec_run"]}
                                                                  if "tokens_per_sec_run" in r else {})} for r in scalars}
    summary = summarize(steps, 1.0, {"device": "cpu", "gpus": 1})
    assert summary["tokens_per_sec"] == round(run, 1)
    del steps[12]["tokens_per_sec_run"], steps[8]["tokens_per_sec_run"]  # without it: the logged samples' mean
    assert summarize(steps, 1.0, {"device": "cpu", "gpus": 1})["tokens_per_sec"] == round(sampled, 1)
