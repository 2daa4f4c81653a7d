"""The train stage over several processes, for real, where it can run: CPU processes over gloo, through
the same torchrun path as several GPUs (stages/launch.py). Two processes on one node through `dvc repro`;
a signal to the stage leaves no process behind and the run resumes; two single-process nodes meeting on
loopback, as a Slurm job's nodes would, give one adapter from node 0. Short runs of the tiny model."""
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stages.xtuner_api import free_port
from tests.conftest import env, ran

pytestmark = [pytest.mark.e2e, pytest.mark.two_processes]

ITERS = 10
LONG = 100  # about 20 s of training after the first checkpoint (0.2 s an iteration of the 192-wide default in
# two processes): processes left running would still be there


def edit(project, section: str, **values) -> None:
    """Set keys of one params.yaml section, as a user edits the file (comments kept)."""
    path = project / "params.yaml"
    text = path.read_text(encoding="utf-8")
    start = text.index(f"\n{section}:") + 1
    end = re.compile(r"^\S", re.M).search(text, start + len(section) + 2).start()
    body = text[start:end]
    for key, value in values.items():
        body, n = re.subn(rf"(?m)^(  {key}:) \S+", rf"\1 {value}", body)
        assert n == 1, f"{section}.{key} is not in params.yaml once"
    path.write_text(text[:start] + body + text[end:], encoding="utf-8")


def short_run(project, **train) -> None:
    """A short run of the tiny model, `train` keys changed; no earlier output or checkpoint left."""
    edit(project, "train", **{"max_iters": ITERS, "save_interval": 5, **train})
    edit(project, "eval", max_new_tokens=8)  # the chats before and after training: a few tokens
    shutil.rmtree(project / "models/work", ignore_errors=True)
    shutil.rmtree(project / "reports/train", ignore_errors=True)
    shutil.rmtree(project / "models/checkpoints")


def run(*cmd: str, cwd, verbose: bool = False) -> str:
    """A command that must succeed, its stdout and stderr; bounded, so that processes that never meet fail
    the test instead of hanging it (gloo would wait 30 minutes). `verbose`: the libraries' log lines on
    the terminal too (PIPELINE_VERBOSE=1), as every rank prints them."""
    proc = subprocess.run(cmd, cwd=cwd, env={**env(), **({"PIPELINE_VERBOSE": "1"} if verbose else {})},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def assert_one_adapter_and_metrics(project, built, iters: int, gpus: int, nodes: int = 1) -> None:
    import torch

    (last,) = list((project / "models/checkpoints").glob(f"iter_{iters}.pth"))
    adapter = torch.load(last, weights_only=True)["state_dict"]
    assert adapter.keys() == torch.load(built / "models/adapter.pth", weights_only=True)["state_dict"].keys()
    metrics = json.loads((project / "reports/train/metrics.json").read_text())
    assert (metrics["iters"], metrics["gpus"], metrics["nodes"], metrics["device"]) == (iters, gpus, nodes, "cpu")
    loss = (project / "reports/train/plots/metrics/train/loss.tsv").read_text().splitlines()
    assert len(loss) == iters + 1 and all(math.isfinite(float(line.split("\t")[1])) for line in loss[1:])
    # trained: LoRA's B matrices start at zero (a loss over 10 steps of different packs is too noisy to
    # fall for sure; the default's loss curve is pinned in tests/test_training.py)
    assert all(w.abs().sum() > 0 for k, w in adapter.items() if "lora_B" in k)


def _descendants(pid: int) -> dict[int, list[str]]:
    import psutil

    try:
        return {c.pid: c.cmdline() for c in psutil.Process(pid).children(recursive=True)}
    except psutil.Error:
        return {}


def _parent(pid: int) -> int | None:
    import psutil

    try:
        return psutil.Process(pid).ppid()
    except psutil.Error:
        return None


def _alive(pids) -> list[int]:
    import psutil

    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_signal_to_the_stage_leaves_no_process_behind_and_the_run_resumes(built, project, tmp_path, sig):
    """SIGTERM is passed on to torchrun, which stops its workers, and the stage ends by it; SIGKILL
    reaches torchrun as its parent-death signal, and each worker dies with torchrun. Either way nothing
    trains on, and the next run resumes from the last checkpoint. That run is `dvc repro train` in two
    CPU processes, as a user runs it: both ranks join and load the checkpoint, one adapter and one set of
    metrics come out (each distributed run starts four processes and costs about 35 s of CPU, so one run
    checks both)."""
    short_run(project, gpus=2, global_batch=2, max_iters=LONG)
    run(sys.executable, "-m", "stages.render", cwd=project)
    log = tmp_path / "train.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "stages.train"], cwd=project, env=env(), stdout=sink,
                                stderr=subprocess.STDOUT, start_new_session=True)
    last = project / "models/work/last_checkpoint"
    seen: dict[int, list[str]] = {}
    try:
        deadline = time.time() + 240
        # the first checkpoint (iter_5) on disk: mmengine names it in last_checkpoint when it queues the write
        # (stages/background_save.py), and a signal before the rename loses it (the run then starts clean)
        while not (last.exists() and Path(last.read_text().strip()).is_file()):  # an empty name reads as "."
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            seen.update(_descendants(proc.pid))
            time.sleep(0.1)
        seen.update(_descendants(proc.pid))
        launcher = [pid for pid, cmd in seen.items() if "torch.distributed.run" in cmd]
        # torchrun's own children: a worker's short-lived child (forked, seen before it execs or exits; `seen`
        # keeps every process ever polled) carries the worker's command line too, and ended the old count at 3
        workers = [pid for pid, cmd in seen.items() if "--worker" in cmd and pid not in launcher
                   and _parent(pid) in launcher]
        assert len(workers) == 2 and launcher, seen
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == -sig
        deadline = time.time() + 10  # they stop within a second; left running, they would train on for 20 s
        while _alive(seen) and time.time() < deadline:
            time.sleep(0.2)
        assert not _alive(seen), {pid: seen[pid] for pid in _alive(seen)}
    finally:  # a failed test leaves nothing training either
        if proc.poll() is None:
            proc.kill()
        for pid in _alive(seen):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert not (project / "models/checkpoints").exists()
    if sig == signal.SIGKILL:
        return  # the resume is SIGTERM's case; it is the same after either
    resumed_from = last.read_text().strip()
    ckpt = os.path.basename(resumed_from)
    out = run("dvc", "repro", "train", cwd=project, verbose=True)  # both ranks' log lines
    assert ran(out) == ["render", "train"]  # render ran above outside DVC, with the same output
    assert "[train] torchrun: 2 CPU processes, meeting at 127.0.0.1:" in out
    for rank in (0, 1):
        assert f"[train] process {rank} of 2 joined (gloo, node rank 0, local rank {rank})" in out
    assert "[train] resuming from" in out and ckpt in out
    assert out.count(f"Loads checkpoint by local backend from path: {resumed_from}") == 2  # both ranks load it
    assert f"resumed epoch: 0, iter: {ckpt[len('iter_'):-len('.pth')]}" in out
    assert "Distributed training: True" in (project / "reports/train/xtuner.log").read_text()  # XTuner's log
    assert_one_adapter_and_metrics(project, built, LONG, gpus=2)
    assert out.count("[train] done in") == 1  # the stage's record, not the workers'
    assert json.loads((project / "reports/stages/train.json").read_text())["wall_time_s"] > 0


def test_two_nodes_on_loopback_train_into_one_adapter_written_by_node_0(built, project, tmp_path):
    """Two train stages in one project (a filesystem the nodes share), node ranks from $SLURM_NODEID and
    the meeting point from $MASTER_ADDR and $MASTER_PORT, as the README's Slurm job sets them."""
    short_run(project, gpus=1, nodes=2, global_batch=2)
    run(sys.executable, "-m", "stages.render", cwd=project)
    port = free_port()
    procs, logs = [], []
    for node in (1, 0):
        logs.append(tmp_path / f"node{node}.log")
        node_env = {**env(), "SLURM_NODEID": str(node), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                    "OMP_NUM_THREADS": "1"}  # two nodes on two cores
        with open(logs[-1], "w") as sink:
            procs.append(subprocess.Popen([sys.executable, "-m", "stages.train"], cwd=project, env=node_env,
                                          stdout=sink, stderr=subprocess.STDOUT, start_new_session=True))
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    node1, node0 = (log.read_text() for log in logs)
    assert codes == [0, 0], node0[-3000:] + node1[-3000:]
    assert f"[train] torchrun: node 0 of 2, 1 CPU processes, meeting at 127.0.0.1:{port}" in node0
    assert "[train] process 0 of 2 joined (gloo, node rank 0, local rank 0)" in node0
    assert "[train] process 1 of 2 joined (gloo, node rank 1, local rank 0)" in node1
    assert "[train] node 1: done; node 0 writes models/checkpoints" in node1
    assert "[train] models/checkpoints:" in node0 and "[train] models/checkpoints:" not in node1
    assert "[train] done in" in node0 and "[train] done in" not in node1  # one stage record: node 0's
    assert_one_adapter_and_metrics(project, built, ITERS, gpus=1, nodes=2)
