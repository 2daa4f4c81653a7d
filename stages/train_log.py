"""Training scalars -> DVCLive: per-step plots and the summary metrics `dvc metrics diff` compares.

mmengine writes one JSON line per logging interval to `<work>/<timestamp>/vis_data/scalars.json`,
a new timestamped folder per run (a resumed run adds one). They are merged by step, later runs
winning, and written with DVCLive to reports/train/ (plots/metrics/*.tsv, metrics.json), and as
TensorBoard event files, the tutorial's way of laying two runs' loss curves over each other:

  reports/train/tensorboard/     this run's (a DVC output: an experiment's comes back with it)
  models/tensorboard/<run>/      every run trained in this workspace, one folder each, named after the
                                 DVC experiment (`dvc exp run -n NAME`) or the time; never cached, so
                                 `tensorboard --logdir models/tensorboard` overlays them all

and the trainers' log files (environment, config, every logged step) into reports/train/xtuner.log.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

from stages.paths import TENSORBOARD_RUNS, TRAIN_LIVE

# mmengine/XTuner scalar -> DVCLive metric name
LOGGED = {"loss": "loss", "lr": "lr", "grad_norm": "grad_norm", "tokens_per_sec": "tokens_per_sec",
          "memory": "memory_mb", "time": "iter_time_s", "tokens_per_sec_run": "tokens_per_sec_run"}
RUN_ONLY = {"tokens_per_sec_run"}  # the run's figure so far (stages/throughput.py): a summary, not a curve


def read_scalars(work: Path) -> dict[int, dict]:
    """step -> scalars, over every run in the work dir (timestamped folders sort by time)."""
    steps: dict[int, dict] = {}
    for path in sorted(work.glob("*/vis_data/scalars.json")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                rec = json.loads(line)
                step = int(rec.get("step", rec.get("iter", 0)))
                steps[step] = {LOGGED[k]: float(v) for k, v in rec.items() if k in LOGGED}
    return dict(sorted(steps.items()))


def summarize(steps: dict[int, dict], wall: float, pipeline: dict, tokens_per_iter: float | None = None) -> dict:
    """The run's summary. tokens/s is every token XTuner's ThroughputHook counted over the time they took
    after the first logging interval (stages/throughput.py); without that figure, the mean of the hook's
    logged iterations after the first; where the hook does not run (the llava recipe), `tokens_per_iter`
    over the mean iteration time, when given."""
    rows = list(steps.values())
    losses = [r["loss"] for r in rows if "loss" in r]
    run = [r["tokens_per_sec_run"] for r in rows if "tokens_per_sec_run" in r]
    speeds = run[-1:] or [r["tokens_per_sec"] for r in rows if "tokens_per_sec" in r][1:]  # first: start-up
    if not speeds and tokens_per_iter:
        speeds = [tokens_per_iter / r["iter_time_s"] for r in rows if r.get("iter_time_s")][1:]
    gpu_mem = [r["memory_mb"] for r in rows if "memory_mb" in r]
    # Linux: kilobytes; the largest of this process and the ones it waited for (torchrun's workers)
    rss_kb = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return {
        "final_loss": round(statistics.fmean(losses[-5:]), 4) if losses else None,
        "first_loss": round(losses[0], 4) if losses else None,
        "iters": max(steps) if steps else 0,
        "tokens_per_sec": round(statistics.fmean(speeds), 1) if speeds else None,
        "peak_memory_mb": round(max(gpu_mem) if gpu_mem else rss_kb / 1024, 1),
        "peak_memory_kind": "gpu_allocated" if gpu_mem else "process_rss",
        "wall_time_s": round(wall, 1),
        "device": pipeline["device"], "gpus": pipeline["gpus"], "nodes": pipeline.get("nodes", 1),
    }


def write_live(work: Path, wall: float, pipeline: dict, out: Path = TRAIN_LIVE,
               tokens_per_iter: float | None = None) -> dict:
    """Write every step with DVCLive and the summary into its metrics.json; return the summary."""
    from dvclive import Live

    steps = read_scalars(work)
    summary = summarize(steps, wall, pipeline, tokens_per_iter)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    # dvcyaml=None: DVCLive must not edit the project's dvc.yaml; save_dvc_exp=False: no experiment
    # of its own (the stage may already be running inside `dvc exp run`).
    with Live(dir=str(out), dvcyaml=None, save_dvc_exp=False, report=None) as live:
        for step, values in steps.items():
            live.step = step
            for name, value in values.items():
                if name not in RUN_ONLY:
                    live.log_metric(f"train/{name}", value)
        for key, value in summary.items():
            live.summary[key] = value
    (out / "plots" / "metrics").mkdir(parents=True, exist_ok=True)  # DVC's plots output, even with no step logged
    run = os.environ.get("DVC_EXP_NAME") or time.strftime("%Y%m%d-%H%M%S")
    for folder in (out / "tensorboard", TENSORBOARD_RUNS / run):
        write_tensorboard(steps, folder)
    logs = sorted(work.glob("*/*.log"))
    if logs:
        with open(out / "xtuner.log", "w", encoding="utf-8") as log:
            for path in logs:
                log.write(path.read_text(encoding="utf-8", errors="replace"))
    print(f"[train] {out}: {len(steps)} logged steps; TensorBoard: tensorboard --logdir {TENSORBOARD_RUNS}"
          + (f"; XTuner's log and config: {out / 'xtuner.log'}" if logs else ""),
          file=sys.stderr if not steps else sys.stdout)
    return summary


def write_tensorboard(steps: dict[int, dict], folder: Path) -> None:
    """The scalars as TensorBoard event files in `folder` (emptied first), under DVCLive's names."""
    import shutil

    from torch.utils.tensorboard import SummaryWriter

    if folder.exists():
        shutil.rmtree(folder)
    with SummaryWriter(log_dir=str(folder)) as writer:
        for step, values in steps.items():
            for name, value in values.items():
                if name not in RUN_ONLY:
                    writer.add_scalar(f"train/{name}", value, step)
