"""stages/snapshots.py on mmengine's own runner (a small model on the CPU): every checkpoint the
CheckpointHook writes gets its snapshot, taken from the model, and the snapshot is byte for byte what
reading the checkpoint file back gives (stages/xtuner_api.py `save_adapter`)."""
from __future__ import annotations

from collections import OrderedDict

import pytest

torch = pytest.importorskip("torch")
mmengine = pytest.importorskip("mmengine")

from stages.xtuner_api import patch_stack  # noqa: E402

patch_stack()

from mmengine.model import BaseModel  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

from stages.snapshots import AdapterSnapshots  # noqa: E402
from stages.xtuner_api import save_adapter  # noqa: E402


class Toy(BaseModel):
    def __init__(self) -> None:
        super().__init__()
        self.frozen, self.adapter = torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)
        self.frozen.requires_grad_(False)

    def state_dict(self, *args, **kwargs):  # as XTuner's SupervisedFinetune: the trained weights alone
        return OrderedDict((k, v) for k, v in super().state_dict(*args, **kwargs).items() if k.startswith("adapter."))

    def forward(self, data, data_samples=None, mode="loss"):
        return {"loss": self.adapter(self.frozen(data["x"])).pow(2).mean()}


class Batches(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int) -> dict:
        return {"x": torch.full((4,), float(i % 3))}


def test_snapshots_are_the_checkpoints_weights(tmp_path):
    snapshots = tmp_path / "snapshots"
    runner = Runner(
        model=Toy(), work_dir=str(tmp_path / "work"), experiment_name="snapshots",
        train_dataloader=dict(dataset=Batches(), batch_size=2, collate_fn=lambda b: {"data": {
            "x": torch.stack([it["x"] for it in b])}}, sampler=dict(type="DefaultSampler", shuffle=False)),
        optim_wrapper=dict(optimizer=dict(type="AdamW", lr=0.1)),
        train_cfg=dict(by_epoch=False, max_iters=6),
        custom_hooks=[dict(type=AdapterSnapshots, folder=str(snapshots))],
        default_hooks=dict(checkpoint=dict(type="CheckpointHook", by_epoch=False, interval=2, max_keep_ckpts=10)),
        log_processor=dict(by_epoch=False), default_scope="mmengine")
    runner.train()
    names = sorted(p.name for p in snapshots.iterdir())
    assert names == ["iter_2.pth", "iter_4.pth", "iter_6.pth"]
    seen = []
    for name in names:
        again = tmp_path / "again" / name
        save_adapter(tmp_path / "work" / name, again)  # the checkpoint file (with its optimizer state) read back
        assert (snapshots / name).read_bytes() == again.read_bytes(), name
        weights = torch.load(snapshots / name, weights_only=True)["state_dict"]
        assert sorted(weights) == ["adapter.bias", "adapter.weight"]
        seen.append(weights["adapter.weight"])
    assert not torch.equal(seen[0], seen[-1])  # the snapshots follow the training
