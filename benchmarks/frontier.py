"""Sweep the embedded default's settings in parallel runs and record every checkpoint's scores.

Issue 16's target on the embedded default: a checkpoint with general leak <= 0.43 and held-out
identity hit rate >= 0.71. This runs the real pipeline up to `select` (stand-in pretraining, data,
validate, render, XTuner training on the CPU, every checkpoint scored) once per setting, each in its
own clone of the project on one CPU thread, many side by side (a many-core host gets through a grid
in one sitting), and writes one JSON line a setting: the params set, every checkpoint's scores, the
select rule's choice, whether any checkpoint meets the target, and each stage's wall time.

    python -m benchmarks.frontier SETTINGS.json --jobs 14 --out frontier-out
    python -m benchmarks.frontier --plot frontier.png RESULTS.jsonl... [--default reports/select/scores.json]

SETTINGS.json: a list of {"name": ..., "set": {"data.assistant.general_ratio": 0.35, ...}} (dotted
params keys, as `dvc exp run -S` takes them). Run it from a clean committed checkout; results go to
OUT/frontier.jsonl (appended) and each run's log to OUT/logs/NAME.log.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

TARGET_LEAK = 0.43
TARGET_HELDOUT = 0.71


def set_params(params: Path, updates: dict, write: bool = True) -> None:
    """The dotted keys of `updates` set in the params file, comments kept; a key the file lacks is one line."""
    from ruamel.yaml import YAML

    yaml = YAML()
    data = yaml.load(params.read_text(encoding="utf-8"))
    for dotted, value in updates.items():
        node = data
        *parents, last = dotted.split(".")
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, dict) or last not in node:
            raise SystemExit(f"frontier: {params}: no params key {dotted}")
        node[last] = value
    if write:
        with params.open("w", encoding="utf-8") as handle:
            yaml.dump(data, handle)


def meets(row: dict) -> bool:
    return row["general_identity_leak"] <= TARGET_LEAK and row["identity_hit_rate_heldout"] >= TARGET_HELDOUT


def run_one(setting: dict, root: Path, work: Path, out: Path, timeout: int) -> dict:
    name = setting["name"]
    clone = work / name
    shutil.rmtree(clone, ignore_errors=True)
    subprocess.run(["git", "clone", "-q", str(root), str(clone)], check=True)
    set_params(clone / "params.yaml", setting.get("set", {}))
    for stale in ("select", "stages", "train"):  # the committed reports: a failed run must not show them
        shutil.rmtree(clone / "reports" / stale, ignore_errors=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONUNBUFFERED="1")
    log = out / "logs" / f"{name}.log"
    start = time.monotonic()
    with log.open("w") as handle:
        try:
            proc = subprocess.run([sys.executable, "-m", "dvc", "repro", "select"], cwd=clone, env=env,
                                  stdout=handle, stderr=subprocess.STDOUT, timeout=timeout)
            status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
        except subprocess.TimeoutExpired:
            status = "timeout"
    record: dict = {"name": name, "set": setting.get("set", {}), "status": status,
                    "wall_s": round(time.monotonic() - start, 1)}
    reports = clone / "reports"
    stages = {}
    for path in sorted((reports / "stages").glob("*.json")):
        stages[path.stem] = json.loads(path.read_text()).get("wall_time_s")
    record["stage_wall_s"] = stages
    scores_path = reports / "select" / "scores.json"
    if scores_path.exists():
        scores = json.loads(scores_path.read_text())
        record["scores"] = scores
        record["meets"] = [row["step"] for row in scores if row["step"] and meets(row)]
    choice_path = reports / "select" / "choice.json"
    if choice_path.exists():
        choice = json.loads(choice_path.read_text())
        record["choice"] = {key: choice.get(key) for key in (
            "chosen_step", "within_limits", "identity_hit_rate_heldout", "general_identity_leak",
            "identity_hit_rate_trained", "perplexity_general")}
    metrics_path = reports / "train" / "metrics.json"
    if metrics_path.exists():
        train = json.loads(metrics_path.read_text())
        record["train"] = {key: train.get(key) for key in ("final_loss", "iters", "tokens_per_sec", "wall_time_s")}
    shutil.rmtree(clone, ignore_errors=True)
    return record


def plot(out: Path, results: list[Path], default: Path | None) -> int:
    """Every checkpoint of every run: general leak against held-out identity, the target's corner shaded;
    the runs with a checkpoint in it in colour, `default` (a scores.json) in black, its choice ringed. The
    number of runs drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for path in results for line in path.read_text().splitlines() if line.strip()]
    records = [rec for rec in records if rec["status"] == "ok"]  # a failed run's scores are not its own
    fig, ax = plt.subplots(figsize=(7, 5))
    ax.add_patch(plt.Rectangle((-0.02, TARGET_HELDOUT), TARGET_LEAK + 0.02, 1.04 - TARGET_HELDOUT,
                               color="tab:green", alpha=0.12, label="the target"))
    for rec in records:
        rows = [r for r in rec.get("scores", []) if r["step"]]
        if not rows:
            continue
        x = [r["general_identity_leak"] for r in rows]
        y = [r["identity_hit_rate_heldout"] for r in rows]
        if rec.get("meets"):
            ax.scatter(x, y, s=14, alpha=0.6, label=f"{rec['name']} ({len(rec['meets'])} in)")
        else:
            ax.scatter(x, y, s=8, color="grey", alpha=0.15)
    if default is not None:
        rows = [r for r in json.loads(default.read_text()) if r["step"]]
        ax.scatter([r["general_identity_leak"] for r in rows], [r["identity_hit_rate_heldout"] for r in rows],
                   s=22, color="black", label="the default, this machine")
        choice = default.with_name("choice.json")
        if choice.is_file():
            c = json.loads(choice.read_text())
            ax.scatter([c["general_identity_leak"]], [c["identity_hit_rate_heldout"]], s=180, facecolors="none",
                       edgecolors="black", linewidths=1.5)
    ax.set_xlabel("general answers naming the identity (leak)")
    ax.set_ylabel("identity hit rate, held-out questions")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.04)
    ax.set_title(f"{sum(len([r for r in rec.get('scores', []) if r['step']]) for rec in records)} checkpoints "
                 f"of {len(records)} runs (grey: none in the target)", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return len(records)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "--plot":
        parser = argparse.ArgumentParser(prog="python -m benchmarks.frontier --plot")
        parser.add_argument("out", type=Path)
        parser.add_argument("results", type=Path, nargs="+")
        parser.add_argument("--default", type=Path, default=None, help="a scores.json to draw in black")
        args = parser.parse_args(argv[1:])
        plot(args.out, args.results, args.default)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("settings", type=Path, help="JSON list of {name, set}")
    parser.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    parser.add_argument("--out", type=Path, default=Path("frontier-out"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/frontier-runs"))
    parser.add_argument("--timeout", type=int, default=900, help="seconds per setting")
    args = parser.parse_args(argv)
    settings = json.loads(args.settings.read_text())
    root = Path.cwd()
    for setting in settings:  # every key checked before any run starts
        set_params(root / "params.yaml", setting.get("set", {}), write=False)
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    results = args.out / "frontier.jsonl"
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_one, s, root, args.work, args.out, args.timeout) for s in settings]
        for future in futures:
            record = future.result()
            with results.open("a") as handle:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            best = record.get("choice") or {}
            print(f"{record['name']}: {record['status']} {record['wall_s']} s, meets at {record.get('meets')}, "
                  f"chosen {best.get('chosen_step')} heldout {best.get('identity_hit_rate_heldout')} "
                  f"leak {best.get('general_identity_leak')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
