"""Where a `stage_runs.sh select-cost` run's seconds go, read from DVC's stamped output of
`dvc repro -f -s train select` (each line prefixed with the time it came: `select-cost-train-*.log`):
a table, and with --plot a bar a run, its phases stacked, the runs without the scorer beside those with it.

    python -m benchmarks.select_cost benchmarks/results/select/call14-train-*.log
    python -m benchmarks.select_cost --plot benchmarks/results/select/where-the-seconds-go.png \\
        benchmarks/results/select/call1[34]-train-*.log

The phases, from DVC's first line (DVC's own start before it, 0.8-1.8 s in calls 13 and 14, is the same both
ways and not in the log): the train stage's start to its params line (the process and its imports), the loop to
the last step's line (the chat before training, the steps, the checkpoints), the train stage's writing of its
outputs, its wait for the scorer's last group, DVC hashing the outputs and writing the lock file, and the select
stage (its process, reading the scores, or loading the base model and scoring every checkpoint).
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

# (phase, the line that ends it: a prefix of the stage's line, after the stamp)
PHASES = (("train stage's start", "[train] params"), ("loop", "[train] step "),
          ("writing its outputs", "[train] models/checkpoints"), ("waiting for the scorer", "[train] done"),
          ("DVC: hashes, lock file", "Running stage 'select'"), ("select stage", None))
COLOURS = ("#bbbbbb", "#4c72b0", "#8c8c8c", "#dd8452", "#cccccc", "#c44e52")


def phases(log: Path) -> dict[str, float]:
    """Seconds of each phase of one run's stamped log; one line naming the log when it is not one."""
    stamped = []
    for line in log.read_text(errors="replace").splitlines():
        head, _, text = line.partition(" ")
        try:
            stamped.append((float(head), text))
        except ValueError:
            continue
    if not stamped or not any(text.startswith("Running stage 'select'") for _, text in stamped):
        raise SystemExit(f"{log}: not the stamped output of `dvc repro -f -s train select` (stage_runs.sh select-cost)")
    t0, out, at = stamped[0][0], {}, stamped[0][0]
    for name, ends in PHASES:
        if ends is None:
            end = stamped[-1][0]
        else:
            # the last step's line is the last "[train] step" line; the others, their first
            hits = [t for t, text in stamped if text.startswith(ends)]
            end = (hits[-1] if name == "loop" else hits[0]) if hits else at
        out[name], at = round(max(0.0, end - at), 2), max(at, end)
    out["total"] = round(at - t0, 2)
    return out


def label(log: Path) -> str:
    """`call14-train-20-True-run3.log` -> `call 14, run 3, beside`."""
    m = re.search(r"call(\d+)-train-\d+-(True|False)-run(\d+)", log.name)
    if not m:
        return log.stem
    return f"call {m[1]}, run {m[3]}, {'scorer beside' if m[2] == 'True' else 'no scorer'}"


def table(runs: list[tuple[str, dict[str, float]]]) -> list[str]:
    names = [name for name, _ in PHASES]
    out = ["| run | " + " | ".join(names) + " | total |", "| --- |" + " --- |" * (len(names) + 1)]
    for run, p in runs:
        out.append(f"| {run} | " + " | ".join(f"{p[n]:.1f}" for n in names) + f" | {p['total']:.1f} |")
    return out


def plot(out: Path, runs: list[tuple[str, dict[str, float]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 0.45 * len(runs) + 1.6))
    for i, (run, p) in enumerate(runs):
        left = 0.0
        for (name, _), colour in zip(PHASES, COLOURS):
            ax.barh(i, p[name], left=left, color=colour, edgecolor="white", label=name if i == 0 else None)
            left += p[name]
        ax.text(left + 1.0, i, f"{left:.1f} s", va="center", fontsize=8)
    # the target: 10% over the train part (all but select) of the same call's runs without the scorer
    for call in sorted({run.split(",")[0] for run, _ in runs}):
        without = [p["total"] - p["select stage"] for run, p in runs if run.startswith(call + ",") and "no scorer" in run]
        beside = [i for i, (run, _) in enumerate(runs) if run.startswith(call + ",") and "beside" in run]
        if without and beside:
            line = 1.1 * sum(without) / len(without)
            ax.vlines(line, min(beside) - 0.45, max(beside) + 0.45, colors="black", linestyles="dashed", linewidth=1,
                      label="10% over the same call's train stage without the scorer")
    ax.set_xlim(0, 1.1 * max(p["total"] for _, p in runs))
    ax.set_yticks(range(len(runs)), [run for run, _ in runs], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds from DVC's first line (`dvc repro -f -s train select`)")
    ax.set_title("Scoring every checkpoint: where each run's seconds go (InternLM2-1.8B, 160 iterations, 8 checkpoints)",
                 fontsize=9)
    ax.legend(fontsize=7, ncol=4, loc="lower center", bbox_to_anchor=(0.5, 1.06), frameon=False)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.select_cost", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+", type=Path, help="stamped `select-cost-train-*.log` files of one or more calls")
    parser.add_argument("--plot", type=Path, help="draw the runs' phases into this PNG instead of printing the table")
    args = parser.parse_args(argv)
    for log in args.logs:
        if not log.is_file():
            raise SystemExit(f"{log}: no such file")
    runs = sorted(((label(log), phases(log)) for log in args.logs),
                  key=lambda r: (r[0].split(",")[0], "beside" in r[0], r[0]))
    if args.plot:
        plot(args.plot, runs)
        print(f"wrote {args.plot}")
        return
    print("\n".join(table(runs)))


if __name__ == "__main__":
    main()
