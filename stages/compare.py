"""Compare experiments: what the tutorial did by hand in TensorBoard (LoRA rank 128 against 64).

Given two or more revisions (commits, branches, tags, DVC experiment names, or `workspace`), writes
one report: the params that differ, the headline metrics side by side with deltas against the first,
the loss curves overlaid in one PNG, and each one's answers to the same prompts.

    dvc exp run -S lora.r=128 -n r128 && dvc exp run -S lora.r=64 -n r64
    python -m stages.compare r128 r64                 # writes reports/compare/compare.md + loss.png
    python -m stages.compare HEAD workspace --out /tmp/cmp
"""
from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path
from typing import Any, Sequence

from stages.errors import fail
from stages.io import write_text
from stages.paths import GENERATIONS, PARAMS, REPORTS, SELECT
from stages.reporting import LOSS_TSV, plot_losses, read_tsv, table

METRICS = REPORTS / "metrics.json"


def resolve(rev: str) -> str | None:
    """A commit SHA for a git revision or DVC experiment name; None for the workspace."""
    if rev == "workspace":
        return None
    from dvc.repo import Repo
    from dvc.scm import RevError, resolve_rev

    try:
        with Repo() as repo:
            return resolve_rev(repo.scm, rev)
    except RevError:
        fail(f"{rev}: not a commit, branch, tag or experiment of this repository (see `dvc exp show`)")


def read_at(sha: str | None, path: Path) -> str | None:
    """A git-tracked file's text at a commit (or in the workspace); None where it does not exist."""
    if sha is None:
        return path.read_text(encoding="utf-8") if path.is_file() else None
    proc = subprocess.run(["git", "show", f"{sha}:{path.as_posix()}"], capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else None


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: obj}


def snapshot(rev: str) -> dict:
    """Params, metrics, loss curve and answers of one revision."""
    from ruamel.yaml import YAML

    sha = resolve(rev)
    params_text = read_at(sha, PARAMS)
    if params_text is None:
        fail(f"{rev}: has no {PARAMS}")
    metrics, loss, answers, scores, choice = (read_at(sha, p) for p in (
        METRICS, LOSS_TSV, GENERATIONS, SELECT / "scores.json", SELECT / "choice.json"))
    return {
        "label": rev, "sha": sha[:7] if sha else "workspace",
        "params": flatten(YAML(typ="safe", pure=True).load(params_text)),
        "metrics": json.loads(metrics) if metrics else {},
        "loss": read_tsv(loss) if loss else None,
        "answers": [json.loads(line) for line in answers.splitlines() if line.strip()] if answers else [],
        "scores": json.loads(scores) if scores else [], "choice": json.loads(choice) if choice else {},
    }


def delta(value: Any, base: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not isinstance(base, (int, float)) or isinstance(base, bool):
            return f"{value:g}"
        d = value - base
        rel = f" ({d / base:+.1%})" if base else ""
        return f"{value:g} ({d:+.4g}){rel}" if d else f"{value:g}"
    return "" if value is None else str(value)


def _asked(answer: dict) -> str:
    """The prompt, with the image it is about (llava recipe: one prompt, several images)."""
    return f"{answer['prompt']} [{Path(answer['image']).name}]" if answer.get("image") else answer["prompt"]


def compare(runs: list[dict], out: Path) -> str:
    labels = [f"{r['label']} ({r['sha']})" if r["label"] != r["sha"] else r["label"] for r in runs]
    keys = sorted({k for r in runs for k in r["params"]})
    differ = [[k] + [r["params"].get(k) for r in runs] for k in keys
              if len({json.dumps(r["params"].get(k), sort_keys=True) for r in runs}) > 1]
    mkeys = [k for k in runs[0]["metrics"]] + sorted({k for r in runs[1:] for k in r["metrics"]} -
                                                     set(runs[0]["metrics"]))
    metric_rows = [[k] + [delta(r["metrics"].get(k), runs[0]["metrics"].get(k) if i else None)
                          for i, r in enumerate(runs)] for k in mkeys]
    curves = {lab: r["loss"] for lab, r in zip(labels, runs) if r["loss"]}
    if curves:
        plot_losses(curves, out / "loss.png", "Training loss")
    frontier = {lab: r for lab, r in zip(labels, runs) if any("general_identity_leak" in s for s in r["scores"])}
    if frontier:
        plot_frontier(frontier, out / "frontier.png")
    prompts = [(a["kind"], _asked(a)) for a in runs[0]["answers"]]
    by_run = [{(a["kind"], _asked(a)): a.get("tuned") for a in r["answers"]} for r in runs]
    md = [f"# Comparison: {' vs '.join(labels)}", "",
          "Written by `python -m stages.compare`; deltas are against the first.", "",
          "## Params that differ", "",
          table(["param"] + labels, differ) if differ else "No params differ.", "",
          "## Metrics", "", table(["metric"] + labels, metric_rows) if metric_rows else "No metrics.", "",
          "## Training loss", "", "![training loss](loss.png)" if curves else "No loss curves.", "",
          "## Checkpoints: identity against general leak", "",
          "Every scored checkpoint of each run (stage select), the chosen one ringed: up and to the left is "
          "better.\n\n![frontier](frontier.png)" if frontier else "No scored checkpoints.", "",
          "## Answers of the tuned models", "",
          table(["kind", "prompt"] + labels, [[k, p] + [b.get((k, p)) for b in by_run] for k, p in prompts])
          if prompts else "No answers.", ""]
    return "\n".join(md)


def plot_frontier(runs: dict[str, dict], path: Path) -> None:
    """Held-out identity hit rate against general leak, one point a checkpoint, a colour a run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for label, run in runs.items():
        pts = [s for s in run["scores"] if s.get("step") and "general_identity_leak" in s]
        line, = ax.plot([s["general_identity_leak"] for s in pts], [s["identity_hit_rate_heldout"] for s in pts],
                        "o", alpha=0.6, label=label)
        chosen = next((s for s in pts if s["step"] == run["choice"].get("chosen_step")), None)
        if chosen:
            ax.plot(chosen["general_identity_leak"], chosen["identity_hit_rate_heldout"], "o", markersize=14,
                    markerfacecolor="none", color=line.get_color())
    ax.set_xlabel("general answers naming the identity (leak)")
    ax.set_ylabel("identity hit rate, held-out questions")
    ax.set_xlim(-0.05, 1.05), ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.compare", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("revs", nargs="+", metavar="REV", help="commit, branch, tag, experiment name, or workspace")
    parser.add_argument("--out", default=str(REPORTS / "compare"), help="output folder (default: reports/compare)")
    args = parser.parse_args(argv)
    if len(args.revs) < 2:
        fail("give at least two revisions to compare (for example: HEAD workspace)")
    out = Path(args.out)
    runs = [snapshot(rev) for rev in args.revs]
    write_text(out / "compare.md", compare(runs, out))
    print(f"[compare] {out / 'compare.md'}: {len(runs)} runs", flush=True)


if __name__ == "__main__":
    from stages.errors import run

    run(main)
