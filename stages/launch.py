"""Several training processes: the train stage's torchrun, on one node or several, and its workers' start.

A run with more than one process (`train.gpus` per node x `train.nodes`) goes through torchrun: one
process a GPU (NCCL; DeepSpeed ZeRO-2 by default), or CPU processes (gloo, plain DDP through mmengine).
Every node runs the train stage. Node 0's stage owns models/work/ (it decides whether to resume) and,
after torchrun ends, writes the outputs; the other nodes' stages only run their share of processes, so
the project, models/work/ included, must be on a filesystem the nodes share.

Where the nodes meet comes from params: `train.node_rank`, `train.master_addr`, `train.master_port`,
`auto` taken from what a scheduler sets ($SLURM_NODEID, $NODE_RANK, $MASTER_ADDR, $MASTER_PORT).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Sequence

from stages.errors import fail

DEFAULT_PORT = 29500  # torchrun's own default: what several nodes agree on when nothing else is said
NODE_RANK_VARS = ("SLURM_NODEID", "NODE_RANK")
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def rendezvous(t, environ: Mapping[str, str] = os.environ) -> dict:
    """torchrun's node rank, master address and port for params' train section `t`, each `auto`
    resolved: one node meets itself on 127.0.0.1 at a free port (nothing to agree with another
    machine, and two runs on one host do not collide); several take what the scheduler set."""
    from stages.xtuner_api import free_port

    rank = t.node_rank
    if rank == "auto":
        name = next((n for n in NODE_RANK_VARS if environ.get(n, "").strip()), None)
        raw = environ[name].strip() if name else "0"
        if not raw.isdigit():
            fail(f"train.node_rank: auto, but ${name} is {raw!r}, not a node index")
        rank = int(raw)
        if rank >= t.nodes:
            fail(f"train.node_rank: auto gives {rank} (${name}), not below train.nodes {t.nodes}")
    addr, port = t.master_addr, t.master_port
    if t.nodes == 1:
        return {"node_rank": rank, "master_addr": "127.0.0.1" if addr == "auto" else addr,
                "master_port": free_port() if port == "auto" else port}
    if addr == "auto":
        addr = environ.get("MASTER_ADDR", "").strip()
        if not addr:
            fail(f"train.master_addr: auto, but $MASTER_ADDR is not set ({t.nodes} nodes must meet at node 0); "
                 "set it, or give node 0's address (on Slurm: the first host of $SLURM_JOB_NODELIST)")
    if port == "auto":
        raw = environ.get("MASTER_PORT", "").strip() or str(DEFAULT_PORT)
        if not raw.isdigit() or not 0 < int(raw) < 65536:
            fail(f"train.master_port: auto, but $MASTER_PORT is {raw!r}, not a TCP port")
        port = int(raw)
    return {"node_rank": rank, "master_addr": addr, "master_port": port}


def torchrun_command(t, meet: dict, worker_args: Sequence[str]) -> list[str]:
    """torchrun (torch.distributed.run) on this node: `t.gpus` processes of `python -m stages.train
    --worker`, static rendezvous at node 0."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={t.nodes}", f"--node-rank={meet['node_rank']}",
            f"--nproc-per-node={t.gpus}", f"--master-addr={meet['master_addr']}",
            f"--master-port={meet['master_port']}", "-m", "stages.train", "--worker", *worker_args]


def run_torchrun(cmd: list[str], what: str, env: Mapping[str, str] | None = None) -> None:
    """torchrun in its own process group, which dies with this stage. A SIGTERM, SIGINT or SIGHUP to
    the stage is passed on (torchrun stops its workers: SIGTERM, then SIGKILL after 30 s), and the stage
    then ends by that signal, as the single-process trainer would; a SIGKILL to the stage reaches
    torchrun as SIGTERM (parent-death signal), and each worker dies with torchrun (`die_with_parent`)."""
    proc = subprocess.Popen(cmd, start_new_session=True, env=None if env is None else dict(env),
                            preexec_fn=lambda: die_with_parent(signal.SIGTERM))
    received: list[int] = []

    def forward(signum, _frame):
        received.append(signum)
        os.killpg(proc.pid, signum)

    saved = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        code = proc.wait()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    if received:
        signal.signal(received[0], signal.SIG_DFL)
        os.kill(os.getpid(), received[0])
    if code:
        fail(f"training failed on {what} (torchrun exited {code}; see the log above)")


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask Linux to send `sig` to this process when its parent exits (prctl PR_SET_PDEATHSIG): torchrun
    starts each worker in a session of its own, where no signal to torchrun's group reaches it."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request: nothing would come
        os.kill(os.getpid(), sig)


def join_process_group(backend: str) -> None:
    """In one of torchrun's workers: the process group, made before mmengine would make it. mmengine's
    own start calls `torch.cuda.set_device`, which a CPU-only torch lacks (`AttributeError:
    ... _cuda_setDevice`); mmengine and DeepSpeed use a group that exists."""
    import torch
    import torch.distributed as dist

    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend=backend)
    print(f"[train] process {dist.get_rank()} of {dist.get_world_size()} joined ({backend}, node rank "
          f"{os.environ.get('GROUP_RANK', '?')}, local rank {os.environ.get('LOCAL_RANK', '?')})", flush=True)


def shared_resume(resume: str | None) -> Path | None:
    """The checkpoint every process resumes from: global rank 0's (node 0's stage decided it from
    models/work/; the other nodes' stages leave models/work/ alone and pass none)."""
    import torch.distributed as dist

    box = [resume]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0]) if box[0] else None
