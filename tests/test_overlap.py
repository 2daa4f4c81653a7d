"""stages/overlap.py on mmengine's own runner (a small model on the CPU): the same numbers reach the
message hub, the logs and the weights with the hook as without it, and its batches drop a mask of ones."""
from __future__ import annotations

import json

import torch

from stages.xtuner_api import patch_stack  # noqa: E402

patch_stack()  # what every stage does before XTuner's stack loads (torchvision's ops, among others)

from mmengine.model import BaseModel  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

from stages.overlap import Overlap, without_full_mask  # noqa: E402


class Toy(BaseModel):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(4, 1)
        self.masks: list = []

    def forward(self, data, data_samples=None, mode="loss"):  # as XTuner's SupervisedFinetune is called
        self.masks.append(data["attention_mask"])
        out = self.net(data["x"]).squeeze(-1)
        return {"loss": ((out - data["y"]) ** 2).mean(), "loss_l1": (out - data["y"]).abs().mean()}


class Batches(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 24

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        return {"x": torch.randn(4, generator=g), "y": torch.randn((), generator=g),
                "attention_mask": torch.ones(3, dtype=torch.bool)}


def collate(items: list) -> dict:
    return {"data": {k: torch.stack([it[k] for it in items]) for k in items[0]}}


def train(work, hooks: list) -> tuple[list, dict, list]:
    runner = Runner(
        model=Toy(), work_dir=str(work), experiment_name=f"overlap-{work.name}",  # its own hub and logger
        train_dataloader=dict(dataset=Batches(), batch_size=2, collate_fn=collate,
                              sampler=dict(type="DefaultSampler", shuffle=False)),
        optim_wrapper=dict(optimizer=dict(type="AdamW", lr=0.1), clip_grad=dict(max_norm=0.5),
                           accumulative_counts=2),
        train_cfg=dict(by_epoch=False, max_iters=9), custom_hooks=hooks,
        default_hooks=dict(logger=dict(type="LoggerHook", interval=3), checkpoint=None),
        log_processor=dict(by_epoch=False), default_scope="mmengine")
    runner.train()
    scalars = [json.loads(line) for line in next(work.glob("*/vis_data/scalars.json")).read_text().splitlines()]
    return scalars, {k: v.clone() for k, v in runner.model.state_dict().items()}, runner.model.masks


def test_the_same_logs_and_weights_with_and_without_the_hook(tmp_path):
    plain, plain_weights, masks = train(tmp_path / "plain", [])
    overlapped, weights, dropped = train(tmp_path / "overlap", [dict(type=Overlap)])
    assert len(masks) == len(dropped) == 9 and all(m is not None for m in masks) and all(m is None for m in dropped)
    keep = ("loss", "loss_l1", "grad_norm", "lr", "iter", "step")
    assert [{k: r[k] for k in keep if k in r} for r in overlapped] == [{k: r[k] for k in keep if k in r} for r in plain]
    assert len(plain) == 3 and all("grad_norm" in r for r in plain)
    assert all(torch.equal(plain_weights[k], weights[k]) for k in plain_weights)


def test_a_mask_of_ones_is_dropped_on_the_host_and_a_padded_one_kept():
    ones = {"data": {"input_ids": torch.zeros(2, 3), "attention_mask": torch.ones(2, 3, dtype=torch.bool)}}
    assert without_full_mask(ones)["data"]["attention_mask"] is None
    assert ones["data"]["attention_mask"] is not None  # the loader's batch itself is untouched
    padded = {"data": {"attention_mask": torch.tensor([[True, True, False]])}}
    assert without_full_mask(padded) is padded
