"""Stage `train`: QLoRA fine-tuning with XTuner's trainer, from the rendered config.

What differs by recipe is its step (stages/recipes/<recipe>/train.py): internvl runs XTuner's
InternVL_V1_5 (QLoRA LLM, frozen vision encoder, mlp1) in the rendered dtype (stages/xtuner_api.py
patch_internvl); llava runs the tutorial's two phases, first the tokenized text and the projector in
models/pretrain/ (XTuner's pretrain phase, LLM and vision encoder frozen, unless `llava.pretrained_pth`
gives the projector, checked against the two models), then XTuner's LLaVA fine-tune; the same outputs,
the projector it started from included.

Runs the trainer in this process, so killing the stage kills the trainer. Several processes (GPUs, or
CPU processes over gloo) and several nodes go through torchrun (stages/launch.py), whose workers die
with the stage; node 0's stage owns the work dir and writes the outputs. A `dvc repro` after an interruption resumes from the last
checkpoint when the stage's inputs are unchanged and starts clean when they changed: the work dir
remembers a fingerprint of them. Outputs at fixed paths:

  models/checkpoints/         iter_N.pth: the adapter weights of each checkpoint the schedule saved
                              (train.save_interval) and of the last, no optimizer state; the select
                              stage scores them and copies its choice to models/adapter.pth
  models/work/                XTuner's work dir: logs and checkpoints, kept for resuming (not a DVC
                              output: never cached, never hashed, git-ignored)
  reports/train/              DVCLive: per-step loss, lr, grad norm, tokens/s, memory; metrics.json

With `select.during_training` (auto: on one GPU), the select stage's scorer runs beside the trainer
and scores the checkpoints as they are saved, three at a time (models/work/scores/, read back by the select stage).

    python -m stages.train
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from stages import params as P
from stages.errors import fail, leave_unrecorded, note
from stages.paths import CHECKPOINTS, CONFIG, CONFIG_DIR, SCORED, SNAPSHOTS, TRAIN_WORK, TRAINED
from stages.quiet import quiet_trainer
from stages.train_log import write_live
from stages.xtuner_api import final_checkpoint

FINGERPRINT = "pipeline-inputs.json"


CODE = [Path(__file__), Path(__file__).with_name("train_log.py"), Path(__file__).with_name("xtuner_api.py"),
        Path(__file__).with_name("kernels.py"), Path(__file__).with_name("fp8.py"), Path(__file__).with_name("launch.py"),
        Path(__file__).with_name("snapshots.py"), Path(__file__).with_name("overlap.py"),
        Path(__file__).with_name("background_save.py"),
        Path(__file__).with_name("throughput.py")]


def fingerprint(config_dir: Path, data: Path, model: Path, code: list[Path] = CODE,
                extra: Sequence[Path] = (), extra_models: Sequence[Path] = ()) -> str:
    """What a resume must not cross, as in the stage's deps in dvc.yaml: the rendered config, data,
    code and `extra` folders by content, the base model (and `extra_models`) by file names, sizes and
    times (hashing gigabytes of weights at every start would cost minutes)."""
    h = hashlib.sha256()
    extras = [f for folder in extra for f in sorted(Path(folder).rglob("*"))]
    for path in sorted(config_dir.rglob("*")) + [data] + list(code) + extras:
        if path.is_file():
            h.update(f"{path.name}\0".encode() + path.read_bytes())
    for folder in [model, *extra_models]:
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                st = path.stat()
                h.update(f"{path.relative_to(folder)}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()


def prepare_work_dir(work: Path, fp: str) -> Path | None:
    """Keep the work dir and return the checkpoint to resume from when it was made from the same
    inputs; otherwise empty it (a changed input means a fresh run)."""
    marker = work / FINGERPRINT
    last = work / "last_checkpoint"
    if marker.is_file() and json.loads(marker.read_text())["inputs"] == fp and last.is_file():
        ckpt = Path(last.read_text().strip())
        if not ckpt.exists():  # killed while its file was being written (stages/background_save.py): the one before
            whole = sorted(work.glob("iter_*.pth"), key=lambda path: int(path.stem.split("_")[1]))
            ckpt = whole[-1] if whole else ckpt
        if ckpt.exists():
            for part in work.glob("iter_*.tmp"):
                part.unlink()
            print(f"[train] resuming from {ckpt} (inputs unchanged since it was written)", flush=True)
            return ckpt
    if work.exists():
        if any(work.iterdir()):
            print(f"[train] {work}: inputs changed or no checkpoint; starting clean", flush=True)
        shutil.rmtree(work)
    work.mkdir(parents=True)
    marker.write_text(json.dumps({"inputs": fp}) + "\n")
    return None


def run_distributed(args: argparse.Namespace, pipeline: dict, train, meet: dict, resume: Path | None) -> None:
    """torchrun on this node (stages/launch.py): `train.gpus` workers, joined by the other nodes' when
    `train.nodes` is more than one, meeting where `meet` says."""
    from stages import launch

    worker = ["--params", args.params] + (["--resume", str(resume)] if resume is not None else [])
    env = dict(os.environ)
    if pipeline["device"] == "cpu":  # torchrun would give each process one thread
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // train.gpus)))
    what = (f"node {meet['node_rank']} of {train.nodes}, " if train.nodes > 1 else "") + \
        f"{train.gpus} {'GPUs' if pipeline['device'] == 'cuda' else 'CPU processes'}"
    print(f"[train] torchrun: {what}, meeting at {meet['master_addr']}:{meet['master_port']}", flush=True)
    launch.run_torchrun(launch.torchrun_command(train, meet, worker), what, env)


def ensure_hash_seed(argv: Sequence[str] | None, module: str = "stages.train") -> None:
    """Python's hash seed decides set order, and so the order LoRA layers are created and
    initialised: fix it, or two runs differ."""
    if os.environ.get("PYTHONHASHSEED") != "0":
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        args = list(sys.argv[1:] if argv is None else argv)
        os.execve(sys.executable, [sys.executable, "-m", module, *args], env)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default=str(P.PARAMS), help="params file (default: params.yaml)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--resume", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    ensure_hash_seed(argv)
    params = P.load(args.params)
    from stages import kernels, launch
    from stages.xtuner_api import load_config

    cfg = load_config(CONFIG)
    pipeline = cfg.pipeline
    if pipeline["device"] == "cpu" and "deepspeed" not in sys.modules:
        # DeepSpeed never runs on the CPU (several processes there are DDP over gloo): XTuner's and mmengine's
        # optional imports of it (0.4-0.6 s of CPU at each start) are skipped, as convert's and merge's are
        sys.modules["deepspeed"] = None
    kernels.apply(pipeline)
    from stages.modeldir import use_threads

    use_threads(pipeline.get("cpu_threads"))  # a tiny model on the CPU: one thread (stages/modeldir.py)
    deepspeed = CONFIG_DIR / pipeline["deepspeed_config"] if pipeline["deepspeed_config"] else None
    from stages import recipes

    step = recipes.step(params.recipe, "train")  # stages/recipes/<recipe>/train.py
    step.setup(pipeline)  # every process, torchrun's workers too
    if args.worker:  # one of torchrun's processes
        run_worker(args, cfg, deepspeed)
        return
    check_machine(pipeline, params.train)
    from stages.doctor import require

    require(params, skip=("stack",))  # the preflight: seconds now rather than a failure after training
    P.log_section("train", params.train)
    meet = launch.rendezvous(params.train) if params.train.gpus * params.train.nodes > 1 else None
    if meet and meet["node_rank"] > 0:  # node 0 owns models/work/ and writes the outputs
        leave_unrecorded()
        run_distributed(args, pipeline, params.train, meet, None)
        print(f"[train] node {meet['node_rank']}: done; node 0 writes {CHECKPOINTS} and the metrics", flush=True)
        return
    with quiet_trainer():  # a progress bar; XTuner's log to its file (stages/quiet.py)
        train_node0(params, args, pipeline, step, meet, deepspeed)


def train_node0(params: P.Params, args: argparse.Namespace, pipeline: dict, step, meet: dict | None,
                deepspeed: Path | None) -> None:
    """Node 0 (or the only one): the recipe's preparation, the trainer, then the outputs."""
    from stages.xtuner_api import run_trainer

    inputs = step.before(params)  # what the trainer reads besides the config (llava: its projector phase first)
    fp = fingerprint(CONFIG_DIR, inputs["data"], inputs["model"], extra=inputs.get("extra", ()),
                     extra_models=inputs.get("extra_models", ()))
    resume = prepare_work_dir(TRAIN_WORK, fp)
    scorer = start_scorer(params, pipeline, args.params)
    start = time.time()
    try:
        if meet:
            run_distributed(args, pipeline, params.train, meet, resume)
        else:
            with out_of_memory_says_what_to_lower(pipeline):
                run_trainer(CONFIG, TRAIN_WORK, deepspeed, resume)
    except BaseException:
        stop(scorer)
        raise
    wall = time.time() - start
    ckpt = final_checkpoint(TRAIN_WORK)
    if scorer is not None:
        TRAINED.write_text("")  # the scorer scores the last checkpoint while the outputs are written
    try:
        n, kept = write_checkpoints(ckpt, inputs.get("projector_before"))
        summary = write_live(TRAIN_WORK, wall, pipeline, tokens_per_iter=step.tokens_per_iter(pipeline))
    except BaseException:
        stop(scorer)
        raise
    if summary["peak_memory_kind"] == "gpu_allocated":
        note(peak_gpu_mb=summary["peak_memory_mb"])
    speed = summary["tokens_per_sec"]  # None where the run logged too few steps to leave its start-up out
    speed = f"{speed} tokens/s" if speed is not None else "too few iterations to measure tokens/s"
    print(f"[train] {CHECKPOINTS}: {', '.join(p.name for p in kept)} ({n:,} adapter weights each); final loss "
          f"{summary['final_loss']}, {speed}, {wall:.0f} s", flush=True)
    finish_scorer(scorer)


def start_scorer(params: P.Params, pipeline: dict, params_file: str) -> subprocess.Popen | None:
    """`select.during_training`: the select stage's scorer started beside the trainer (`python -m stages.select
    --during-training`, its output in models/work/scores/scorer.log), so that each checkpoint is scored as it
    is saved and the select stage reads the scores back; auto: on one CUDA GPU (on a CPU the two would share
    the cores). None when off, or when the recipe scores no checkpoint."""
    from stages import recipes

    setting = params.select.during_training
    one_gpu = pipeline["device"] == "cuda" and params.train.gpus * params.train.nodes == 1
    if not recipes.get(params.recipe).SCORES_CHECKPOINTS or setting is False or (setting == "auto" and not one_gpu):
        return None
    SCORED.mkdir(parents=True, exist_ok=True)
    TRAINED.unlink(missing_ok=True)
    # background work: a lower CPU priority and few threads, so that the trainer's host thread, which sets
    # its pace on a GPU, keeps a core (the scorer's own work is on the GPU); on the CPU one thread, as the
    # trainer's there: OpenMP's threads spin while they wait. Two of them beside the trainer on 2 cores (AMD
    # EPYC, a 30-iteration run) took 26 s of CPU to score 3 checkpoints, the training 38 s; one: 5.8 and 18 s
    threads = str(min(4, os.cpu_count() or 1) if pipeline["device"] == "cuda" else 1)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    with open(SCORED / "scorer.log", "w") as log:
        return subprocess.Popen([sys.executable, "-m", "stages.select", "--during-training", "--params", params_file],
                                env=env,
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def finish_scorer(scorer: subprocess.Popen | None) -> None:
    """The trainer is done (train_node0 wrote TRAINED): the scorer scores what is left (the last checkpoint)
    and stops; its summary, or why it stopped (the select stage then scores what it has not)."""
    if scorer is None:
        return
    try:
        scorer.wait(timeout=3600)
    except subprocess.TimeoutExpired:
        stop(scorer)
    lines = (SCORED / "scorer.log").read_text(encoding="utf-8", errors="replace").strip().splitlines() or [""]
    last = lines[-1].removeprefix("[select] ").removeprefix("error: ")
    if scorer.returncode == 0:
        print(f"[train] {last}", flush=True)
    else:
        print(f"[train] the scorer beside the trainer stopped ({last[:200]}; {SCORED / 'scorer.log'}); the select "
              "stage scores the checkpoints", flush=True)


def stop(process: subprocess.Popen | None) -> None:
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def run_worker(args: argparse.Namespace, cfg, deepspeed: Path | None) -> None:
    """One of torchrun's processes: it dies with torchrun, joins the process group (the rendered
    backend: NCCL on GPUs, gloo on CPU), takes global rank 0's resume decision, and trains; the stage's
    record and outputs are the launching process's."""
    from stages import launch
    from stages.xtuner_api import run_trainer

    leave_unrecorded()
    launch.die_with_parent()
    launch.join_process_group(cfg.env_cfg.dist_cfg.backend)
    resume = launch.shared_resume(args.resume)
    with out_of_memory_says_what_to_lower(cfg.pipeline), quiet_trainer():
        run_trainer(CONFIG, TRAIN_WORK, deepspeed, resume, "pytorch")


def write_checkpoints(final: Path, before: Path | None = None) -> tuple[int, list[Path]]:
    """models/checkpoints/: the adapter weights of every checkpoint the run saved (stages/snapshots.py
    kept them in the work dir as they were written), and of the final one, with `before` (llava: the
    projector it started from) in that one; (adapter weights in the final one, the files)."""
    from stages.io import output_dir
    from stages.xtuner_api import save_adapter

    with output_dir(CHECKPOINTS) as tmp:
        for snapshot in sorted(SNAPSHOTS.glob("iter_*.pth")) if SNAPSHOTS.is_dir() else []:
            shutil.copy2(snapshot, tmp / snapshot.name)
        n = save_adapter(final, tmp / final.name, before=before)
    kept = sorted(CHECKPOINTS.glob("iter_*.pth"), key=lambda path: int(path.stem.split("_")[1]))
    return n, kept


@contextlib.contextmanager
def out_of_memory_says_what_to_lower(pipeline: dict):
    """CUDA out of memory, as one line that names the settings to lower (the last checkpoint stays,
    so the next run resumes)."""
    import torch

    try:
        yield
    except torch.OutOfMemoryError:
        fail(out_of_memory_message(pipeline))


def out_of_memory_message(pipeline: dict) -> str:
    est = pipeline.get("estimate_gb")
    budget = pipeline.get("memory_gb")
    fixes = ["a smaller train.memory_gb with train.micro_batch: auto (or a smaller micro_batch)"]
    if not pipeline.get("checkpointing"):
        fixes.append("train.activation_checkpointing: true")
    elif not pipeline.get("offload_activations"):
        fixes.append("train.offload_activations: true")
    if not pipeline.get("fused_loss"):
        fixes.append("train.fused_loss: true")
    if pipeline.get("upcast_frozen"):
        fixes.append("quant.upcast_frozen: false")
    if pipeline.get("fp8") and not pipeline.get("checkpointing"):
        fixes.append("train.fp8: false (its float8 weights kept for the backward pass)")
    fixes.append("train.optimizer: paged_adamw8bit" if pipeline.get("deepspeed") == "none"
                 else "data.max_length")
    return (f"out of GPU memory at micro-batch {pipeline.get('micro_batch')}, activation checkpointing "
            f"{pipeline.get('checkpointing')} (estimated {est} GB of train.memory_gb {budget}); try: "
            + "; ".join(fixes))


def check_machine(pipeline: dict, train) -> None:
    """The config was rendered for a device and a number of processes; refuse to train it on another
    kind of machine or split (the GPU count is the doctor's check, which runs next)."""
    import torch

    here = "cuda" if torch.cuda.is_available() else "cpu"
    if pipeline["device"] == "cuda" and here == "cpu":
        fail(f"{CONFIG} was rendered for cuda but no GPU is visible here; rerun `dvc repro -f render`")
    rendered = (pipeline["gpus"], pipeline.get("nodes", 1))
    if rendered != (train.gpus, train.nodes):
        fail(f"{CONFIG} was rendered for train.gpus {rendered[0]} x train.nodes {rendered[1]}, params say "
             f"{train.gpus} x {train.nodes}; rerun `dvc repro render`")

if __name__ == "__main__":
    from stages.errors import run

    run(main, stage="train")
