"""stages/snapshots.py and stages/background_save.py on mmengine's own runner (a small model on the CPU):
every checkpoint the CheckpointHook writes gets its snapshot, taken from the model, byte for byte what
reading the checkpoint file back gives (stages/xtuner_api.py `save_adapter`); checkpoints written by a
thread hold their own iteration's state however slow the write, are whole or absent, and a failed write
stops the training; a resume after a lost write takes the newest whole checkpoint."""
from __future__ import annotations

import uuid
from collections import OrderedDict

import pytest
import torch

from stages.xtuner_api import patch_stack  # noqa: E402

patch_stack()

from mmengine.model import BaseModel  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

from stages import background_save  # noqa: E402
from stages.background_save import BackgroundCheckpoints  # noqa: E402
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


def train(tmp_path, background: bool = True, iters: int = 6):
    snapshots = tmp_path / "snapshots"
    hooks = [dict(type=BackgroundCheckpoints)] if background else []
    runner = Runner(
        model=dict(type=Toy), work_dir=str(tmp_path / "work"),
        train_dataloader=dict(dataset=Batches(), batch_size=2, collate_fn=lambda b: {"data": {
            "x": torch.stack([it["x"] for it in b])}}, sampler=dict(type="DefaultSampler", shuffle=False)),
        optim_wrapper=dict(optimizer=dict(type="AdamW", lr=0.1)),
        train_cfg=dict(by_epoch=False, max_iters=iters),
        custom_hooks=hooks + [dict(type=AdapterSnapshots, folder=str(snapshots))],
        default_hooks=dict(checkpoint=dict(type="CheckpointHook", by_epoch=False, interval=2, max_keep_ckpts=10)),
        log_processor=dict(by_epoch=False), default_scope="mmengine", experiment_name=f"snapshots-{uuid.uuid4().hex[:12]}",
        randomness=dict(seed=0))
    runner.train()
    return snapshots


@pytest.mark.parametrize("background", [True, False])
def test_snapshots_are_the_checkpoints_weights(tmp_path, background):
    snapshots = train(tmp_path, background)
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


def test_background_checkpoints_hold_their_iterations_state(tmp_path, monkeypatch):
    """Each write held back until training has gone on: the file still has its own iteration's weights and
    optimizer state (those of a run that wrote in the loop), and no partial file is left."""
    write_file = background_save._write_file

    def slow(obj, path):
        import time

        time.sleep(0.3)  # the loop runs on meanwhile (the next save waits for this one)
        write_file(obj, path)

    monkeypatch.setattr(background_save, "_write_file", slow)
    train(tmp_path / "background", background=True)
    train(tmp_path / "loop", background=False)
    for step in (2, 4, 6):
        ours = torch.load(tmp_path / "background" / "work" / f"iter_{step}.pth", weights_only=False)
        theirs = torch.load(tmp_path / "loop" / "work" / f"iter_{step}.pth", weights_only=False)
        assert ours["meta"]["iter"] == theirs["meta"]["iter"] == step
        for key, value in theirs["state_dict"].items():
            assert torch.equal(ours["state_dict"][key], value), (step, key)
        for index, state in theirs["optimizer"]["state"].items():
            for key, value in state.items():
                assert torch.equal(ours["optimizer"]["state"][index][key], value), (step, index, key)
    assert not list((tmp_path / "background").rglob("*.tmp"))
    for step in (2, 4, 6):  # the snapshots, written behind their checkpoints, are the loop's too
        name = f"iter_{step}.pth"
        assert (tmp_path / "background/snapshots" / name).read_bytes() == (tmp_path / "loop/snapshots" / name).read_bytes()


def test_a_failed_background_write_stops_the_training(tmp_path, monkeypatch):
    import torch as torch_module

    def full_disk(obj, path, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch_module, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        train(tmp_path, background=True)
    assert not list((tmp_path / "work").glob("iter_*"))


def test_a_resume_after_a_lost_write_takes_the_newest_whole_checkpoint(tmp_path, monkeypatch):
    from stages import train as stage

    work = tmp_path / "work"
    work.mkdir()
    (work / stage.FINGERPRINT).write_text('{"inputs": "same"}\n')
    for step in (2, 4):
        (work / f"iter_{step}.pth").write_bytes(b"whole")
    (work / "iter_6.tmp").write_bytes(b"half")  # killed before the rename
    (work / "last_checkpoint").write_text(str(work / "iter_6.pth"))
    assert stage.prepare_work_dir(work, "same") == work / "iter_4.pth"
    assert not (work / "iter_6.tmp").exists()
    (work / "last_checkpoint").write_text(str(work / "iter_4.pth"))
    assert stage.prepare_work_dir(work, "same") == work / "iter_4.pth"
    assert stage.prepare_work_dir(work, "changed") is None and not (work / "iter_4.pth").exists()


def test_a_checkpoint_written_while_the_snapshot_hook_looks_keeps_its_snapshot(tmp_path, monkeypatch):
    """The writer renames a checkpoint, then marks its write done; the snapshot hook asks whether the write is
    pending, then whether the file exists. Here every write finishes just as the hook asks (a slow writer, and
    `pending` waiting for it): each checkpoint still gets its snapshot."""
    write_file, pending = background_save._write_file, background_save.pending

    def slow(obj, path):
        import time

        time.sleep(0.2)
        write_file(obj, path)

    def finished_as_asked(path):
        background_save.wait()
        return pending(path)

    monkeypatch.setattr(background_save, "_write_file", slow)
    monkeypatch.setattr(background_save, "pending", finished_as_asked)
    snapshots = train(tmp_path, background=True)
    assert sorted(p.name for p in snapshots.iterdir()) == ["iter_2.pth", "iter_4.pth", "iter_6.pth"]
